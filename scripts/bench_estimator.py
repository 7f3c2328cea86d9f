"""Benchmark the estimator: per feature variant, and the compiled tables against the LightGBM booster.

    python scripts/bench_estimator.py variants results/<run_id> [more runs] [--variant tokens --variant embedding]
    python scripts/bench_estimator.py tables models/default-tokens

`variants` prints, per variant: training time (s, with the held-out fit), load time (ms), the cost of one prefill
and one decode prediction from a raw dict row (µs, features included; the embedding variant embeds the text on
every call), 1,000 decode rows in one call (µs), predict_request with 1,024 new tokens (µs), and held-out
(by-prompt) MAPE per phase next to the noise-floor MAPE and their ratio.

`tables` measures, in one run, the scheduler's path (compiled tables) against the booster path on the same
model: one prefill row with new arguments each call, predict_request with random text_tokens 16-4096 and
new_tokens 1-4096 (uncached: there is no memo), predict_requests over 10,000 requests; the largest relative
difference to the booster on every trained config at every length breakpoint ± 1 and at random lengths, and of
request totals against the exact sum of per-step booster predictions; and the tables' memory. Lengths beyond
the training range are asked with allow_unseen=True (the tables hold the trees' exact answer there too).
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from estimator import EstimatorError, LatencyEstimator
from estimator.data.runs import load_runs
from estimator.model.features import VARIANTS
from estimator.model.train import train_estimator
from estimator.study.analyze import noise_floor
from estimator.study.references import median_call_us

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)


def _row(frame: Any, axes: list[str], phase: str, with_text: bool) -> dict[str, Any]:
    r = frame.iloc[len(frame) // 2]
    cols = (
        [*axes, "text_tokens"] + (["position"] if phase == "decode" else []) + (["text"] if with_text else [])
    )
    return {c: (r[c].item() if hasattr(r[c], "item") else r[c]) for c in cols}


@app.command()
def variants(
    runs: Annotated[list[Path], typer.Argument(help="Run folders.")],
    variant: Annotated[
        list[str] | None, typer.Option(help="Variants to bench (repeatable) [default: all].")
    ] = None,
    calls: Annotated[int, typer.Option(help="Single-row calls per median.")] = 300,
) -> None:
    """Bench each variant on the given runs."""
    console = Console(width=160)
    try:
        runset = load_runs(runs)
    except EstimatorError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    floors = noise_floor(runset.samples, runset.config_columns)
    variants = variant or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        typer.echo(f"error: unknown variant(s) {', '.join(unknown)}", err=True)
        raise typer.Exit(2)
    pre = runset.with_text(runset.phase("prefill"))
    dec = runset.with_text(runset.phase("decode"))
    rows_1000 = dec.sample(n=min(1000, len(dec)), random_state=0).reset_index(drop=True)
    table = Table(title=f"Estimator benchmark on {', '.join(r.run_id for r in runset.runs)}")
    for c in (
        "variant",
        "train s",
        "load ms",
        "prefill 1 row µs",
        "decode 1 row µs",
        f"decode {len(rows_1000)} rows µs",
        "request 1024 tok µs",
        "prefill MAPE % (× noise)",
        "decode MAPE % (× noise)",
    ):
        table.add_column(c, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            console.print(f"[dim]training {v}[/dim]")
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
            table.add_row(
                v,
                f"{train_s:.1f}",
                f"{load_ms:.0f}",
                f"{pre_us:.0f}",
                f"{dec_us:.0f}",
                f"{many_us:.0f}",
                f"{req_us:.1f}",
                *cells,
            )
    console.print(table)
    console.print(
        "noise-floor MAPE (same prompt, leave-one-out): "
        + ", ".join(f"{p} {f.mape_pct:.2f}% over {f.groups} groups" for p, f in floors.items())
    )


def _per_call_us(fn: Any, args: list[tuple[Any, ...]]) -> float:
    """Mean wall time (µs) of fn(*a) over the argument list, each argument set used once."""
    t0 = time.perf_counter()
    for a in args:
        fn(*a)
    return (time.perf_counter() - t0) / len(args) * 1e6


@app.command()
def tables(
    model: Annotated[Path, typer.Argument(help="Model folder (estimate train) with tables.npz.")],
    calls: Annotated[int, typer.Option(help="Calls per timing (each with new arguments).")] = 20_000,
    seed: int = 0,
) -> None:
    """The compiled tables against the booster path: cost per call and agreement."""
    console = Console(width=160)
    est = LatencyEstimator.load(model)
    t = est.tables
    if t is None:
        typer.echo(f"error: {model} has no compiled tables (variant {est.variant})", err=True)
        raise typer.Exit(2)
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
    rows = []
    pre_us = _per_call_us(lambda r: est.predict_prefill(r, allow_unseen=True), pre_rows)
    pre_b_us = _per_call_us(booster_prefill, booster_rows)
    rows.append(("predict_prefill, one row, new arguments each call", f"{pre_us:.2f} µs", f"{pre_b_us:.1f} µs"))
    req_args = [(cfg, int(a), int(b)) for a, b in zip(n[:calls], new[:calls], strict=True)]
    req_us = _per_call_us(lambda c, a, b: est.predict_request(c, a, b, allow_unseen=True), req_args)
    req_b_us = _per_call_us(lambda c, a, b: booster_request(c, a, b - 1), req_args[:100])
    rows.append(("predict_request, text_tokens 16-4096, new_tokens 1-4096", f"{req_us:.2f} µs", f"{req_b_us:.0f} µs"))
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
    table = Table(title=f"Compiled tables vs the LightGBM booster: {model} ({est.variant})")
    for col in ("figure", "tables", "booster"):
        table.add_column(col, justify="right" if col != "figure" else "left")
    for r in rows:
        table.add_row(*r)
    table.add_row("largest relative difference, prefill (every config, breakpoints ± 1)", f"{worst_pre:.2e}", "")
    table.add_row("largest relative difference, decode step", f"{worst_dec:.2e}", "")
    table.add_row("request total vs the exact per-step booster sum", f"{worst_sum:.2e}", "")
    table.add_row(
        "tables in memory",
        f"{t.nbytes() / 1024:.1f} KiB",
        f"{len(t.keys)} configs; prefill {len(t.prefill_t)} breakpoints; decode {len(t.decode_t)} × {len(t.decode_p)}",
    )
    console.print(table)


if __name__ == "__main__":
    app()
