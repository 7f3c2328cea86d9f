"""The scheduler experiment's estimator side (`estimate experiment scheduler DIR`), over the files that
`profile experiment scheduler` writes (harness/experiments/scheduler.py): `setup.json`, `alone.parquet` and
`raw/<policy>-<mult>-<seed>.parquet`, one row per request.

- `set_slo`: the SLOs, fixed before any policy runs: per class (short/long prompt, contract/workload.py
  `LONG_PROMPT_MIN`), TTFT and TPOT SLO = K x the class's median alone; K given, or SCALE_RULE from the replica.
- `analyze`: per policy and rate, SLO attainment (contract/slo.py `meets_slo`; a rejected request misses), the
  rejection rate, E2E mean/p99 and TTFT p99 of the served, the decision cost; goodput per policy and seed
  (contract/slo.py `goodput`, the one definition), its t interval over seeds, the ratio to FCFS per seed and a
  paired bootstrap that resamples each trace's requests identically for every policy; and, SIMULATED, the same
  traces in the replica.
- `regoodput`: the goodput figures again from a results file's stored rows (attainment per policy, rate and
  seed), for results whose raw request rows were not kept; the bootstrap needs those rows and is left as stored.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from contract.request import Request
from contract.slo import goodput, meets_slo
from contract.workload import bimodal, mix_requests, slo_class
from estimator.errors import EstimatorError
from estimator.sim.policies import EstimatePolicy
from estimator.sim.workload import Overheads, engine_config_from_manifest, run_workload

POLICIES = ("fcfs", "prompt", "estimate", "estimate-admit", "oracle")
CONFIG = {"tier": 0, "top_k": 0, "blocks": 128}  # the engine config of results written before setup had `config`
SCALES = (2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0)
SCALE_RULE = ("the smallest of 2-20x (TTFT and TPOT alike) at which the replica predicts FCFS meets both SLOs "
              "for >= 95% of requests at the lowest rate (chosen before any policy ran)")


def read_setup(folder: Path) -> dict[str, Any]:
    path = folder / "setup.json"
    try:
        setup: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EstimatorError(f"{path}: not a scheduler experiment's setup ({exc})") from None
    missing = [k for k in ("capacity_rps", "engine", "count", "model") if k not in setup]
    if missing:
        raise EstimatorError(f"{path} lacks {', '.join(missing)}")
    return setup


def classes(frame: pd.DataFrame) -> pd.Series:
    """Each request row's SLO class (contract/workload.py `slo_class`: its declared class, else short/long by its
    prompt; rows written before classes were recorded are short/long)."""
    labels = frame["client_class"] if "client_class" in frame else pd.Series([""] * len(frame), index=frame.index)
    return pd.Series([slo_class(int(n), c or None) for n, c in zip(frame["text_tokens"], labels, strict=True)],
                     index=frame.index)


def slo_of(alone: pd.DataFrame, scale: float) -> dict[str, dict[str, float]]:
    """Per class: TTFT and TPOT SLO = `scale` x the class's median alone."""
    slo = {}
    for name, g in alone.groupby(classes(alone)):
        t, p = float(g["ttft_ms"].median()), float(g["tpot_ms"].median())
        slo[str(name)] = {"ttft_ms": scale * t, "tpot_ms": scale * p, "alone_ttft_ms": t, "alone_tpot_ms": p,
                          "alone_e2e_ms": float(g["e2e_ms"].median())}
    return slo


def request_sets(setup: Mapping[str, Any], seeds: Sequence[int]) -> dict[int, list[Request]]:
    """Each seed's requests at unit rate, as the harness drew them: the setup's mix, or the bimodal traces of
    results written before mixes (every client declaring its true length)."""
    count = int(setup["count"])
    if "mix" in setup:
        return {s: mix_requests(setup["mix"]["name"], 1.0, count, s) for s in seeds}
    return {s: bimodal(1.0, count, s) for s in seeds}


def met(frame: pd.DataFrame, slo: Mapping[str, Any]) -> np.ndarray:
    """Per request: its class's SLO met (contract/slo.py `meets_slo`; a rejected request misses; a one-token
    request has no TPOT)."""
    rejected = frame["rejected"].to_numpy(dtype=bool) if "rejected" in frame else np.zeros(len(frame), bool)
    out = []
    for c, new, ttft, tpot, rej in zip(classes(frame), frame["new_tokens"], frame["ttft_ms"],
                                       frame["tpot_ms"], rejected, strict=True):
        lim = slo[c]
        out.append(meets_slo(float(ttft), None if new <= 1 else float(tpot), lim["ttft_ms"], lim["tpot_ms"],
                             served=not rej))
    return np.asarray(out, dtype=bool)


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and its 95% t interval (NaN ends with fewer than two values)."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, math.nan, math.nan
    h = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - h, m + h


def simulated(setup: Mapping[str, Any], sets: Mapping[int, list[Request]], mults: Sequence[float],
              policies: Sequence[str] = ("fcfs", "estimate", "estimate, preemptive"),
              lengths: Path | None = None) -> list[dict[str, Any]]:
    """SIMULATED, not measured: the same traces in the replica under FCFS, the estimate policy as vLLM runs it
    (priority orders the waiting queue only) and with preemptive priority (what vLLM does not do, vLLM issue
    #40004): SLO attainment per policy, rate multiple and seed. The estimate's priorities are the `estimate`
    policy's own (`EstimatePolicy.alone_us`: each request alone through the replica, its output length predicted
    from `lengths`, the training trace, where given)."""
    config = dict(setup.get("config") or CONFIG)
    engine = engine_config_from_manifest({"engine": setup["engine"]})
    policy = EstimatePolicy(setup["model"], config, lengths)
    policy.start(setup["engine"], config)
    overheads = Overheads.load(Path(setup["model"]))
    cap, slo = setup["capacity_rps"], setup["slo"]
    rows = []
    for mult in mults:
        for seed, base0 in sets.items():
            base = [r.declaring(arrival_s=r.arrival_s / (mult * cap)) for r in base0]
            prio = [policy.alone_us(r.declared) for r in base]
            for name, eng, pr in (
                ("fcfs", engine, [0] * len(base)),
                ("estimate", replace(engine, policy="priority"), prio),
                ("estimate, preemptive", replace(engine, policy="priority", preemptive_priority=True), prio),
            ):
                if name not in policies:
                    continue
                frame, _ = run_workload(base, eng, policy.model, config, overheads, priorities=pr)
                frame = frame.rename(columns={"prompt_tokens": "text_tokens", "output_tokens": "new_tokens"})
                labels = {r.request_id: r.client_class or "" for r in base}
                frame["client_class"] = frame["request_id"].map(labels)
                rows.append({"policy": name, "mult": mult, "seed": seed, "attainment": float(met(frame, slo).mean())})
    return rows


def set_slo(folder: Path, scale: float | None) -> dict[str, Any]:
    """Fix the SLOs in `folder/setup.json` (K given, or SCALE_RULE); refuses to change SLOs once policies ran."""
    setup = read_setup(folder)
    if any((folder / "raw").glob("*.parquet")) and "slo" in setup:
        raise EstimatorError(f"{folder}: policies already ran under the SLOs in setup.json; re-judge them with "
                             "estimate experiment scheduler DIR --slo-scale K instead")
    alone = pd.read_parquet(folder / "alone.parquet")
    if scale is None:
        sets = request_sets(setup, sorted(int(s) for s in alone["seed"].unique()))
        lowest = min(float(m) for m in setup.get("mults") or [0.5])
        scale, rule = SCALES[-1], SCALE_RULE
        for k in SCALES:
            rows = simulated({**setup, "slo": slo_of(alone, k)}, sets, [lowest], policies=("fcfs",))
            if statistics.mean(r["attainment"] for r in rows) >= 0.95:
                scale = k
                break
    else:
        rule = "given"
    setup.update({"slo_scale": scale, "slo_scale_rule": rule, "slo": slo_of(alone, scale)})
    (folder / "setup.json").write_text(json.dumps(setup, indent=1, default=str))
    return setup


def _goodput_table(att: Mapping[tuple[str, float, int], float], cap: float
                   ) -> tuple[dict[str, list[float]], dict[str, list[bool]]]:
    """Per policy, per seed (sorted): goodput (req/s) and whether it is censored, from SLO attainment per
    (policy, rate multiple, seed)."""
    policies = [p for p in POLICIES if any(k[0] == p for k in att)]
    point: dict[str, list[float]] = {}
    censored: dict[str, list[bool]] = {}
    for p in policies:
        for s in sorted({k[2] for k in att if k[0] == p}):
            mults = sorted(k[1] for k in att if k[0] == p and k[2] == s)
            good = goodput([m * cap for m in mults], [att[(p, m, s)] for m in mults])
            point.setdefault(p, []).append(good.rate_rps)
            censored.setdefault(p, []).append(good.censored)
    return point, censored


def _attainment(rows: pd.DataFrame) -> dict[tuple[str, float, int], float]:
    return {(str(p), float(m), int(s)): float(a)
            for p, m, s, a in zip(rows["policy"], rows["mult"], rows["seed"], rows["attainment"], strict=True)}


def _summary_row(p: str, point: Mapping[str, list[float]], censored: Mapping[str, list[bool]],
                 boot: tuple[float, float], decision_us: float) -> dict[str, Any]:
    m, lo, hi = t_interval(point[p])
    ratios = [a / b if b > 0 else math.nan for a, b in zip(point[p], point["fcfs"], strict=True)]
    rm, rlo, rhi = t_interval(ratios)
    return {"policy": p, "goodput_rps": point[p], "goodput_mean_rps": m, "goodput_t95": [lo, hi],
            "ratio_to_fcfs": ratios, "ratio_t95": [rm, rlo, rhi], "ratio_bootstrap95": list(boot),
            "censored": censored[p], "decision_us": decision_us}


ROW_COLUMNS = ("policy", "mult", "seed", "request_id", "text_tokens", "new_tokens", "max_tokens", "client_class",
               "ttft_ms", "e2e_ms", "tpot_ms", "priority", "decision_us", "rejected", "rejected_reason")


def request_rows(folder: Path) -> pd.DataFrame:
    """Every request row of the experiment: `raw/` (one file per policy, rate and seed, as measured) and the cells
    of `requests.parquet` that `raw/` lacks, written back as one compact `requests.parquet` (ROW_COLUMNS: what the
    analysis reads; small enough to commit, so a study reruns its statistics, and resumes, from a clone without
    its raw cells)."""
    compact = folder / "requests.parquet"
    frames = [pd.read_parquet(p) for p in sorted((folder / "raw").glob("*.parquet"))]
    if compact.is_file():
        kept = pd.read_parquet(compact)
        have = {(str(f["policy"].iloc[0]), float(f["mult"].iloc[0]), int(f["seed"].iloc[0])) for f in frames}
        cell = list(zip(kept["policy"].astype(str), kept["mult"].astype(float), kept["seed"].astype(int), strict=True))
        frames.append(kept[[c not in have for c in cell]])
    frames = [f for f in frames if len(f)]
    if not frames:
        raise EstimatorError(f"{folder} holds no request rows (raw/ nor requests.parquet)")
    frame = pd.concat(frames, ignore_index=True)
    frame[[c for c in ROW_COLUMNS if c in frame]].to_parquet(compact, index=False)
    return frame


def analyze(folder: Path, slo_scale: float | None = None) -> tuple[dict[str, Any], list[str]]:
    """The results (setup, rows, goodput, simulated) from `folder`'s raw rows, and the lines to print."""
    setup = read_setup(folder)
    if slo_scale:
        setup = {**setup, "slo_scale": slo_scale, "slo_scale_rule": "re-judged with --slo-scale",
                 "slo": slo_of(pd.read_parquet(folder / "alone.parquet"), slo_scale)}
    if "slo" not in setup:
        raise EstimatorError(f"{folder}/setup.json has no SLOs yet (estimate experiment scheduler DIR --set-slo)")
    slo, cap = setup["slo"], setup["capacity_rps"]
    frame = request_rows(folder)
    frame["met"] = met(frame, slo)
    frame["slo_class"] = classes(frame)
    policies = [p for p in POLICIES if p in set(frame["policy"])]
    seeds = sorted(int(s) for s in frame["seed"].unique())
    mults = sorted(float(m) for m in frame["mult"].unique())
    rows = []
    for (policy, mult, seed), g in frame.groupby(["policy", "mult", "seed"]):
        served = g[~g["rejected"].astype(bool)]
        rows.append({"policy": policy, "mult": float(mult), "seed": int(seed), "rate_rps": float(mult) * cap,
                     "attainment": float(g["met"].mean()), "rejected": float(g["rejected"].astype(bool).mean()),
                     "e2e_mean_ms": float(served["e2e_ms"].mean()), "e2e_p99_ms": float(served["e2e_ms"].quantile(.99)),
                     "ttft_p99_ms": float(served["ttft_ms"].quantile(.99)),
                     "tpot_p99_ms": float(served["tpot_ms"].quantile(.99)),
                     "decision_us": float(g["decision_us"].mean()) if g["decision_us"].notna().any() else 0.0})
    table = pd.DataFrame(rows)
    table = table.assign(_o=table["policy"].map(POLICIES.index)).sort_values(["_o", "mult", "seed"]).drop(columns="_o")
    lines = [f"capacity {cap:.2f} req/s (measured); SLOs per class: " + "; ".join(
        f"{k}: TTFT {v['ttft_ms']:.0f} ms, TPOT {v['tpot_ms']:.1f} ms" for k, v in slo.items())
        + f" ({setup['slo_scale']:g}x the class's median alone: {setup['slo_scale_rule']})",
        "policy | rate x cap | req/s | SLO attainment % mean (min-max over seeds) | rejected % | E2E mean ms | "
        "E2E p99 ms | decision us"]
    for policy in policies:
        for mult in mults:
            g = table[(table.policy == policy) & (table.mult == mult)]
            lines.append(f"{policy} | {mult:g} | {mult * cap:.2f} | {g.attainment.mean() * 100:.0f} "
                         f"({g.attainment.min() * 100:.0f}-{g.attainment.max() * 100:.0f}) | "
                         f"{g.rejected.mean() * 100:.1f} | {g.e2e_mean_ms.mean():.0f} | {g.e2e_p99_ms.mean():.0f} | "
                         f"{g.decision_us.mean():.1f}")
    point, censored = _goodput_table(_attainment(table), cap)
    # the paired bootstrap: each trace's requests resampled identically for every policy
    cells = {(p, float(m), int(s)): g.sort_values("request_id")["met"].to_numpy()
             for (p, m, s), g in frame.groupby(["policy", "mult", "seed"])}
    rng = np.random.default_rng(0)
    n = {(m, s): len(cells[("fcfs", m, s)]) for m in mults for s in seeds}
    boot: dict[str, list[float]] = {p: [] for p in policies}
    for _ in range(1000):
        pick = {k: rng.integers(0, v, v) for k, v in n.items()}
        gp, _ = _goodput_table({(p, m, s): float(cells[(p, m, s)][pick[(m, s)]].mean())
                                for p in policies for m in mults for s in seeds}, cap)
        base = statistics.mean(gp["fcfs"])
        for p in policies:
            boot[p].append(statistics.mean(gp[p]) / base if base > 0 else math.nan)
    summary = []
    sets = request_sets(setup, seeds)
    evaluated = [r for rs in sets.values() for r in rs]
    rho = float(stats.spearmanr([r.text_tokens for r in evaluated], [r.output_tokens for r in evaluated])[0])
    long_class = max(slo, key=lambda k: slo[k].get("alone_e2e_ms", slo[k]["alone_ttft_ms"]))
    lines.append("policy | goodput req/s mean [95% t over seeds] (per seed) | x FCFS per seed: mean [t] | "
                 "x FCFS paired bootstrap [95%] | decision us mean")
    for p in policies:
        b = np.asarray(boot[p], dtype=float)
        b = b[np.isfinite(b)]
        bi = (float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))) if len(b) else (math.nan, math.nan)
        row = _summary_row(p, point, censored, bi, float(table[table.policy == p].decision_us.mean()))
        mine = frame[frame.policy == p]
        served = mine[~mine["rejected"].astype(bool)]
        top = mine[mine["mult"] == mine["mult"].max()]["decision_us"].dropna()
        vs_prompt = ([a / b if b > 0 else math.nan for a, b in zip(point[p], point["prompt"], strict=True)]
                     if "prompt" in point else [])
        row.update({
            "mix": setup.get("mix", {}).get("name", "bimodal"), "spearman_rho": rho, "output_known": p == "oracle",
            "seeds": seeds, "ratio_to_prompt": vs_prompt,
            "ratio_to_prompt_t95": list(t_interval(vs_prompt)) if vs_prompt else None,
            "decision_us": float(top.quantile(0.99)) if len(top) else 0.0,
            "decision_us_mean": float(mine["decision_us"].mean()) if mine["decision_us"].notna().any() else 0.0,
            "ttft_p99_ms": float(served["ttft_ms"].quantile(0.99)),
            "tpot_p99_ms": float(served["tpot_ms"].quantile(0.99)),
            "long_class": long_class,
            "long_class_max_wait_ms": float(served[served["slo_class"] == long_class]["ttft_ms"].max()),
        })
        summary.append(row)
        lines.append(_goodput_line(row))
    lines.append(f"mix {setup.get('mix', {}).get('name', 'bimodal')}: Spearman rho(prompt, output) {rho:.2f} over "
                 f"{len(evaluated)} requests; long class {long_class}")
    lines.append("policy | output known | x prompt per seed: mean [t] | decision us p99 (highest rate) | "
                 "TTFT p99 ms | TPOT p99 ms | long class's max wait ms (TTFT, all rates)")
    for row in summary:
        pm, plo, phi = row["ratio_to_prompt_t95"] or (math.nan,) * 3
        lines.append(f"{row['policy']} | {row['output_known']} | {pm:.2f} [{plo:.2f}, {phi:.2f}] | "
                     f"{row['decision_us']:.0f} | {row['ttft_p99_ms']:.0f} | {row['tpot_p99_ms']:.1f} | "
                     f"{row['long_class_max_wait_ms']:.0f}")
    trace = folder / str(setup.get("lengths", ""))
    sim = simulated(setup, sets, mults, lengths=trace if setup.get("lengths") and trace.is_file() else None)
    lines.append("SIMULATED (the replica, not the engine): SLO attainment % by policy and rate x capacity")
    for (name, mult), g in pd.DataFrame(sim).groupby(["policy", "mult"], sort=False):
        lines.append(f"  {name} | {mult:g} | {g.attainment.mean() * 100:.0f}")
    return {"setup": setup, "rows": table.to_dict(orient="records"), "goodput": summary, "simulated": sim}, lines


def _goodput_line(row: Mapping[str, Any]) -> str:
    m, (lo, hi) = row["goodput_mean_rps"], row["goodput_t95"]
    rm, rlo, rhi = row["ratio_t95"]
    blo, bhi = row["ratio_bootstrap95"]
    cens = " (censored: meets the target at the highest rate)" if any(row["censored"]) else ""
    return (f"{row['policy']} | {m:.2f} [{lo:.2f}, {hi:.2f}] ({', '.join(f'{x:.2f}' for x in row['goodput_rps'])})"
            f"{cens} | {rm:.2f} [{rlo:.2f}, {rhi:.2f}] | [{blo:.2f}, {bhi:.2f}] | "
            f"{row.get('decision_us_mean', row['decision_us']):.1f}")


def regoodput(result: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`result` with its goodput rows computed again from its stored attainment rows (the paired bootstrap
    interval kept as stored: it needs the per-request rows), and a line per policy naming any figure that moved."""
    cap = float(result["setup"]["capacity_rps"])
    point, censored = _goodput_table(_attainment(pd.DataFrame(result["rows"])), cap)
    stored = {g["policy"]: g for g in result["goodput"]}
    new, lines = [], []
    for p in point:
        old = stored[p]
        row = _summary_row(p, point, censored, tuple(old["ratio_bootstrap95"]), float(old["decision_us"]))
        moved = [k for k in ("goodput_rps", "goodput_mean_rps", "goodput_t95", "ratio_to_fcfs", "ratio_t95", "censored")
                 if not np.allclose(np.asarray(row[k], dtype=float), np.asarray(old[k], dtype=float), equal_nan=True)]
        new.append(row)
        lines.append(_goodput_line(row) + (f"  [moved: {', '.join(moved)}]" if moved else "  [as stored]"))
    return {**result, "goodput": new}, lines
