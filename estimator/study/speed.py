"""Speed of the estimator's prediction paths and of the simulator: `estimate experiment estimator-speed`,
`estimator-variants` and `simulate-speed` (figures to print, never timed tests: the machines are shared).

- `table_costs`: on one model, the scheduler's path (compiled tables) against the LightGBM booster and against a
  bare `np.searchsorted` plus an index (the floor any table lookup pays), all in one run: one prefill with new
  arguments each call, `predict_request` over random lengths (uncached), `predict_requests` over 10,000; and the
  tables' largest relative difference to the booster at every breakpoint +-1 and at random lengths.
- `variant_costs`: per feature variant, training and load time, single-row and batch prediction cost, and the
  held-out MAPE beside the noise floor.
- `simulate_speed`: 10,000 requests through the scheduler replica, and an 8-rate capacity curve.
- `decision_speed`: one arrival decision of `estimate` and `estimate-admit` (estimator/sim/policies.py) on engine
  states of a scheduler experiment's mix, with 4 to 16 requests held.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from contract.workload import LengthDist, generate_workload, slo_entries
from estimator.data.runs import load_runs, read_manifest
from estimator.errors import EstimatorError
from estimator.model.estimator import LatencyEstimator
from estimator.model.features import VARIANTS
from estimator.model.iteration import IterationEstimator
from estimator.model.train import train_estimator
from estimator.sim.workload import Overheads, capacity_curve, engine_config_from_manifest, run_workload
from estimator.study.analyze import noise_floor
from estimator.study.references import median_call_us

Row = tuple[str, ...]


def _row(frame: Any, axes: list[str], phase: str, with_text: bool) -> dict[str, Any]:
    r = frame.iloc[len(frame) // 2]
    cols = (
        [*axes, "text_tokens"] + (["position"] if phase == "decode" else []) + (["text"] if with_text else [])
    )
    return {c: (r[c].item() if hasattr(r[c], "item") else r[c]) for c in cols}


def _per_call_us(fn: Any, args: list[tuple[Any, ...]]) -> float:
    """Mean wall time (µs) of fn(*a) over the argument list, each argument set used once."""
    t0 = time.perf_counter()
    for a in args:
        fn(*a)
    return (time.perf_counter() - t0) / len(args) * 1e6


def variant_costs(runs: list[Path], variant: list[str] | None, calls: int,
                  say: Any = print) -> tuple[list[str], list[Row], str]:
    """(columns, one row per variant, the noise-floor line) on the given runs."""
    runset = load_runs(runs)
    floors = noise_floor(runset.samples, runset.config_columns)
    variants = variant or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise EstimatorError(f"unknown variant(s) {', '.join(unknown)}")
    pre = runset.with_text(runset.phase("prefill"))
    dec = runset.with_text(runset.phase("decode"))
    rows_1000 = dec.sample(n=min(1000, len(dec)), random_state=0).reset_index(drop=True)
    columns = [

        "variant",
        "train s",
        "load ms",
        "prefill 1 row µs",
        "decode 1 row µs",
        f"decode {len(rows_1000)} rows µs",
        "request 1024 tok µs",
        "prefill MAPE % (× noise)",
        "decode MAPE % (× noise)",
    ]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            say(f"training {v}")
            t0 = time.perf_counter()
            est = train_estimator(runset, v)  # type: ignore[arg-type]
            train_s = time.perf_counter() - t0
            path = est.save(Path(tmp) / v)
            t0 = time.perf_counter()
            est = LatencyEstimator.load(path)
            load_ms = (time.perf_counter() - t0) * 1e3
            axes = est.meta.axes
            text = v == "embedding"
            n_calls = max(5, calls // 30) if text else calls
            one_pre = _row(pre, axes, "prefill", text)
            one_dec = _row(dec, axes, "decode", text)
            pre_us = median_call_us(partial(est.predict_prefill, one_pre), n_calls)
            dec_us = median_call_us(partial(est.predict_decode, one_dec), n_calls)
            # the embedding variant embeds every distinct prompt of the 1,000 rows: one call is enough
            many_us = median_call_us(
                partial(est.predict_decode, rows_1000), 1 if text else 20, 0 if text else 1
            )
            config = {a: one_pre[a] for a in axes}
            req_text = str(one_pre["text"]) if text else None
            n_tok = int(one_pre["text_tokens"])
            request = partial(est.predict_request, config, n_tok, 1024, req_text, allow_unseen=True)
            req_us = median_call_us(request, n_calls)
            held = est.meta.held_out.metrics if est.meta.held_out else {}
            cells = []
            for phase in ("prefill", "decode"):
                mape = (held.get(phase) or {}).get("mape_pct")
                floor = floors[phase].mape_pct
                ratio = (
                    mape / floor if mape is not None and np.isfinite(floor) and floor > 0 else float("nan")
                )
                cells.append("–" if mape is None else f"{mape:.2f} ({ratio:.2f}×)")
            rows.append((
                v,
                f"{train_s:.1f}",
                f"{load_ms:.0f}",
                f"{pre_us:.0f}",
                f"{dec_us:.0f}",
                f"{many_us:.0f}",
                f"{req_us:.1f}",
                *cells,
            ))
    floor_line = "noise-floor MAPE (same prompt, leave-one-out): " + ", ".join(
        f"{p} {f.mape_pct:.2f}% over {f.groups} groups" for p, f in floors.items())
    return columns, rows, floor_line


def table_costs(model: Path, calls: int = 20_000, seed: int = 0) -> list[Row]:
    """(figure, tables, booster) rows: costs per call and agreement (see the module docstring)."""
    est = LatencyEstimator.load(model)
    t = est.tables
    if t is None:
        raise EstimatorError(f"{model} has no compiled tables (variant {est.variant})")
    rng = np.random.default_rng(seed)
    configs = [{a: c[a] for a in est.meta.axes} for c in est.meta.training.configs]
    cfg = configs[len(configs) // 2]
    n = rng.integers(16, 4097, max(calls, 10_000))
    new = rng.integers(1, 4097, max(calls, 10_000))
    pre_rows = [({**cfg, "text_tokens": int(x)},) for x in n[:calls]]
    booster_rows = [({k: np.array([v]) for k, v in r[0].items()},) for r in pre_rows[:2000]]
    pre_model = est.models["prefill"]

    def booster_prefill(cols: dict[str, np.ndarray]) -> None:
        pre_model.predict(cols, 1)

    def booster_request(c: dict[str, Any], tok: int, steps: int) -> float:
        """The exact request total from the booster: the prefill row plus one row per decode step."""
        one = {**{a: np.asarray([c[a]]) for a in est.meta.axes}, "text_tokens": np.asarray([tok])}
        total = float(pre_model.predict(one, 1)[0])
        if steps:
            pos = tok + np.arange(1, steps + 1)
            cols = {a: np.repeat(np.asarray([c[a]]), steps) for a in est.meta.axes}
            cols["text_tokens"] = np.full(steps, tok)
            cols["position"] = pos
            total += float(est.models["decode"].predict(cols, steps).sum())
        return total

    est.predict_prefill(*pre_rows[0], allow_unseen=True)  # warm the config memo, as a scheduler's first call does
    rows: list[Row] = []
    pre_us = _per_call_us(lambda r: est.predict_prefill(r, allow_unseen=True), pre_rows)
    pre_b_us = _per_call_us(booster_prefill, booster_rows)
    rows.append(("predict_prefill, one row, new arguments each call", f"{pre_us:.2f} µs", f"{pre_b_us:.1f} µs"))
    req_args = [(cfg, int(a), int(b)) for a, b in zip(n[:calls], new[:calls], strict=True)]
    req_us = _per_call_us(lambda c, a, b: est.predict_request(c, a, b, allow_unseen=True), req_args)
    req_b_us = _per_call_us(lambda c, a, b: booster_request(c, a, b - 1), req_args[:100])
    rows.append(("predict_request, text_tokens 16-4096, new_tokens 1-4096", f"{req_us:.2f} µs", f"{req_b_us:.0f} µs"))
    # the floor of any lookup: a bare np.searchsorted on the prefill breakpoints plus an index, one call each
    bp, bv, ints = t.prefill_t, t.prefill_value[0], [int(x) for x in n[:calls]]
    bare_us = _per_call_us(lambda x: bv[np.searchsorted(bp, x, side="right") - 1], [(x,) for x in ints])
    rows.append(("bare np.searchsorted + index (the floor), one call", f"{bare_us:.2f} µs", "–"))
    rows.append(("predict_prefill / bare, predict_request / bare (goal <= 2.5)",
                 f"{pre_us / bare_us:.2f}x, {req_us / bare_us:.2f}x", "–"))
    batch_cfgs = [configs[i] for i in rng.integers(0, len(configs), 10_000)]
    bn, bnew = n[:10_000], new[:10_000]
    est.predict_requests(batch_cfgs[:10], bn[:10], bnew[:10], allow_unseen=True)
    t0 = time.perf_counter()
    for _ in range(5):
        est.predict_requests(batch_cfgs, bn, bnew, allow_unseen=True)
    batch_ms = (time.perf_counter() - t0) / 5 * 1e3
    rows.append(("predict_requests, 10,000 requests (mixed configs)", f"{batch_ms:.2f} ms", "–"))
    # agreement: every trained config, every breakpoint ± 1 and random lengths
    worst_pre = worst_dec = worst_sum = 0.0
    for c in configs:
        row = t.index[tuple(str(v) for v in (c[a] for a in est.meta.axes))]
        toks = np.unique(np.concatenate([t.prefill_t - 1, t.prefill_t, t.prefill_t + 1, rng.integers(1, 4097, 200)]))
        toks = toks[toks >= 1]
        cols = {a: np.repeat(np.asarray([c[a]]), len(toks)) for a in est.meta.axes}
        cols["text_tokens"] = toks
        ref = pre_model.predict(cols, len(toks))
        worst_pre = max(worst_pre, float(np.max(np.abs(t.prefill_many(np.full(len(toks), row), toks) / ref - 1))))
        dec_toks = np.unique(np.concatenate([t.decode_t - 1, t.decode_t, t.decode_t + 1, rng.integers(1, 4097, 20)]))
        pos_probe = np.unique(np.concatenate([t.decode_p - 1, t.decode_p, t.decode_p + 1, rng.integers(2, 8193, 200)]))
        for tok in dec_toks[dec_toks >= 1]:
            p = pos_probe[pos_probe > tok]
            dcols = {a: np.repeat(np.asarray([c[a]]), len(p)) for a in est.meta.axes}
            dcols["text_tokens"] = np.full(len(p), tok)
            dcols["position"] = p
            ref_d = est.models["decode"].predict(dcols, len(p))
            worst_dec = max(worst_dec, float(np.max(np.abs(t.decode_steps(row, int(tok), p) / ref_d - 1))))
        for a, b in zip(rng.integers(16, 4097, 20), rng.integers(1, 4097, 20), strict=True):
            exact = booster_request(c, int(a), int(b) - 1)
            got = est.predict_request(c, int(a), int(b), allow_unseen=True).total_ms
            worst_sum = max(worst_sum, abs(got / exact - 1))
    rows.append(("largest relative difference, prefill (every config, breakpoints ± 1)", f"{worst_pre:.2e}", ""))
    rows.append(("largest relative difference, decode step", f"{worst_dec:.2e}", ""))
    rows.append(("request total vs the exact per-step booster sum", f"{worst_sum:.2e}", ""))
    rows.append((
        "tables in memory",
        f"{t.nbytes() / 1024:.1f} KiB",
        f"{len(t.keys)} configs; prefill {len(t.prefill_t)} breakpoints; decode {len(t.decode_t)} × {len(t.decode_p)}",
    ))
    return rows


def simulate_speed(model_dir: Path, engine_run: Path, count: int = 10_000, rate: float = 8.0) -> list[str]:
    """Seconds to simulate `count` requests (one process, one thread) and an 8-rate capacity curve of 1,000
    requests each, as lines to print."""
    model = IterationEstimator.load(model_dir)
    engine = engine_config_from_manifest(read_manifest(engine_run))
    config = dict(model.trained_configs[0])
    texts, news = LengthDist.parse("uniform:32:512", "t"), LengthDist.parse("uniform:8:64", "n")
    reqs = generate_workload(rate, count, 0, texts, news, engine.max_model_len)
    run_workload(reqs[:200], engine, model, config, Overheads())  # warm
    t0 = time.perf_counter()
    _, run = run_workload(reqs, engine, model, config, Overheads())
    one = time.perf_counter() - t0
    lines = [f"{count} requests at {rate:g} req/s: {run.iterations} iterations simulated in {one:.2f} s "
             f"({one / count * 1e6:.0f} us per request; target <= 2 s for 10,000)"]
    rates = list(np.linspace(rate / 4, rate * 2, 8))
    t0 = time.perf_counter()
    capacity_curve(
        rates,
        lambda r: generate_workload(r, 1000, 0, texts, news, engine.max_model_len),
        lambda q: run_workload(q, engine, model, config, Overheads())[0],
        1000.0,
        50.0,
    )
    lines.append(f"capacity curve, 8 rates x 1000 requests: {time.perf_counter() - t0:.2f} s (target <= 20 s)")
    return lines


def decision_speed(folder: Path, held_counts: Sequence[int] = (4, 8, 16), decisions: int = 360,
                   recompute_lengths: bool = False) -> list[Row]:
    """p50 and p99 of one arrival decision (µs) of `estimate` and `estimate-admit`, with the model, output-length
    training trace and SLOs of a scheduler experiment's folder (`profile experiment scheduler --out`). The engine
    state holds the first N requests of the mix's seed-1 trace: the first 4 running (their prompts computed, some
    tokens produced), the rest waiting; each decision is on a later request of the trace. `recompute_lengths`
    drops the output-length predictions before every decision (the cost without them kept)."""
    from contract.policy import Held
    from estimator.sim.policies import EstimateAdmitPolicy, EstimatePolicy
    from estimator.study.scheduling import read_setup, request_sets

    setup = read_setup(folder)
    trace = folder / str(setup.get("lengths") or "lengths-train.jsonl")
    lengths = trace if trace.is_file() else None
    slo = slo_entries(setup.get("slo") or {})
    if not slo:
        raise EstimatorError(f"{folder}/setup.json has no SLOs (estimate experiment scheduler --set-slo first)")
    policies: list[EstimatePolicy] = [EstimatePolicy(setup["model"], setup.get("config"), lengths),
                                      EstimateAdmitPolicy(setup["model"], slo, setup.get("config"), lengths)]
    declared = [r.declared for r in request_sets(setup, [1])[1]]
    if len(declared) < max(held_counts) + 20:
        raise EstimatorError(f"{folder}: {len(declared)} requests a trace, too few for {max(held_counts)} held")
    rows: list[Row] = []
    for policy in policies:
        policy.start(setup["engine"], policy.config or {})
        for n in held_counts:
            held = [Held(d, policy.alone_us(d), 0.05 * (n - i), d.text_tokens if i < 4 else 0, 3 * i if i < 4 else 0,
                         i < 4) for i, d in enumerate(declared[:n])]
            arrivals = declared[n:]
            times = []
            for k in range(decisions):
                if recompute_lengths and policy.lengths is not None:
                    policy.lengths.forget()
                t0 = time.perf_counter()
                policy.decide(arrivals[k % len(arrivals)], held)
                times.append((time.perf_counter() - t0) * 1e6)
            p50, p99 = np.percentile(times, [50, 99])
            rows.append((policy.name, str(n), f"{p50:,.0f}", f"{p99:,.0f}"))
    return rows
