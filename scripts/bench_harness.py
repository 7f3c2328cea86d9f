"""Harness benchmark: throughput, overhead and measurement repeatability (prints figures; not a test).

python scripts/bench_harness.py figures RUN_DIR [RUN_DIR ...]
    from finished runs (e.g. the default sweep): points per minute, engine start times, harness step time vs
    the engine core's own iteration time (multiprocess runs only), peak memory, repeatability (same-prompt
    prefill CV median and p90, decode CV at equal position median and p90) and drift: within each engine start,
    the Spearman correlation between a request's place in the order (`seq`) and its `text_tokens` (target
    |rho| < 0.2: lengths spread over the whole start), and between `seq` and its prefill time relative to its
    point's median (how much the machine drifted).
python scripts/bench_harness.py noise [--out DIR] [--rounds N] [--smoke] [--only LABEL ...]
    runs the same short sweep with each noise guard switched off in turn (garbage-collection guard, warm-up,
    telemetry sampler, CPU pinning where it applies (>= 4 physical cores), vLLM's OMP binding on every core),
    on and off side by side in each of N rounds (default 3; the variants in a shuffled order per round), and
    prints each variant's median over the rounds. Keep a guard only if its "off" row is noisier than the
    default's. The telemetry rows are telemetry's overhead figure: its sampler process (the default) against no
    telemetry and against a sampler thread inside the harness. `--only telemetry` runs just the default and the
    variants whose label contains "telemetry". Run it on a quiet machine; --smoke is a seconds-long check that it
    runs (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.engine.cpu_pinning import plan_pinning  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOISE_SPEC = """
reps = 2
same_prompt_repeats = {same}
max_new_tokens = {new}
warmup_requests = {warmup}
telemetry = {telemetry}
telemetry_mode = "{telemetry_mode}"
gc_guard = {gc_guard}
cpu_pinning = {cpu_pinning}
[axes]
tier = [0]
blocks = [32]
top_k = [0]
text_tokens = {lengths}
"""
DEFAULT = "all guards on (default)"
ON = {"warmup": 3, "telemetry": "true", "telemetry_mode": "process", "gc_guard": "true", "cpu_pinning": "true"}


def variants() -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(label, spec knobs, environment) of each variant; CPU pinning only where its rule applies here."""
    cpus = sorted(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}
    out: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        (DEFAULT, ON, {}),
        ("gc guard off", {**ON, "gc_guard": "false"}, {}),
        ("no warm-up", {**ON, "warmup": 0}, {}),
        ("telemetry off", {**ON, "telemetry": "false"}, {}),
        ("telemetry in a thread", {**ON, "telemetry_mode": "thread"}, {}),
    ]
    pin = plan_pinning(True, "cpu", "multiprocess", env=env)
    if pin.applied:
        out.append(("cpu pinning off", {**ON, "cpu_pinning": "false"}, {}))
    else:
        print(f"cpu pinning does not apply here ({pin.reason}): no 'cpu pinning off' variant", file=sys.stderr)
    # vLLM's OMP binding on every core (its default leaves one for the engine core; this also turns pinning off)
    out.append(("OMP threads on every core", ON, {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus))}))
    return out


def _cv(x: pd.Series) -> float:
    return float(x.std(ddof=1) / x.mean()) if len(x) > 1 and x.mean() > 0 else float("nan")


def repeatability(samples: pd.DataFrame) -> dict[str, float]:
    """CV of the same prompt's prefill step, and of decode steps at equal position (same prompt), in %."""
    same = samples[samples.prompt_kind == "same"]
    pre = same[same.phase == "prefill"].groupby("point_id").latency_ms.agg(_cv).dropna()
    dec = same[same.phase == "decode"].groupby(["point_id", "position"]).latency_ms.agg(_cv).dropna()
    return {
        "prefill_same_prompt_cv_median_pct": 100 * float(pre.median()),
        "prefill_same_prompt_cv_p90_pct": 100 * float(pre.quantile(0.9)),
        "decode_equal_position_cv_median_pct": 100 * float(dec.median()),
        "decode_equal_position_cv_p90_pct": 100 * float(dec.quantile(0.9)),
        "prefill_median_ms": float(same[same.phase == "prefill"].latency_ms.median()),
        "decode_median_ms": float(same[same.phase == "decode"].latency_ms.median()),
    }


DRIFT_RHO_TARGET = 0.2


def drift(samples: pd.DataFrame) -> dict[str, Any]:
    """Within each engine start (engine_config_id), over its requests in their order (`seq`): Spearman's rho
    between `seq` and `text_tokens` (is length confounded with time? target |rho| < 0.2) and between `seq` and
    the request's prefill time over its point's median (did the machine drift?). Median and worst |rho| over
    the engine starts with at least 3 requests (and more than one length, for the first)."""
    if "seq" not in samples or samples.empty:
        return {"drift": "no seq column (a run from before the interleaved order)"}
    pre = samples[samples.phase == "prefill"]
    req = pre.groupby(["engine_config_id", "point_id", "rep"], as_index=False).agg(
        seq=("seq", "first"), text_tokens=("text_tokens", "first"), prefill_ms=("latency_ms", "sum")
    )
    req["prefill_rel"] = req.prefill_ms / req.groupby("point_id").prefill_ms.transform("median")
    by_len, by_time = [], []
    for _, g in req.groupby("engine_config_id"):
        if len(g) < 3:
            continue
        if g.text_tokens.nunique() > 1:
            by_len.append(abs(g.seq.corr(g.text_tokens, method="spearman")))
        by_time.append(g.seq.corr(g.prefill_rel, method="spearman"))
    out: dict[str, Any] = {"drift_engine_starts": len(by_time)}
    if by_len:
        out["drift_seq_vs_text_tokens_abs_rho_median"] = round(float(np.median(by_len)), 3)
        out["drift_seq_vs_text_tokens_abs_rho_max"] = round(float(np.max(by_len)), 3)
        out["drift_seq_vs_text_tokens_ok"] = bool(np.max(by_len) < DRIFT_RHO_TARGET)
    if by_time:
        out["drift_seq_vs_rel_prefill_rho_median"] = round(float(np.nanmedian(by_time)), 3)
        out["drift_seq_vs_rel_prefill_abs_rho_max"] = round(float(np.nanmax(np.abs(by_time))), 3)
    return out


def run_figures(run: Path) -> dict[str, Any]:
    m = json.loads((run / "manifest.json").read_text())
    s = pd.read_parquet(run / "samples")
    t0 = dt.datetime.fromisoformat(m["started_at"])
    t1 = dt.datetime.fromisoformat(m["ended_at"]) if m.get("ended_at") else t0
    minutes = max((t1 - t0).total_seconds() / 60, 1e-9)
    starts = [e["seconds"] for e in m.get("engine_starts", [])]
    measure_s = s.groupby("point_id").t_end_s.max() - s.groupby("point_id").t_start_s.min()
    ok = s.engine_elapsed_ms.notna() & (s.engine_elapsed_ms > 0)
    if m.get("engine_mode") == "inprocess":  # the engine's own time is only the sampling tail there
        ok &= False
    ratio = (s.latency_ms[ok] / s.engine_elapsed_ms[ok]).groupby(s.phase[ok]).median()
    fig: dict[str, Any] = {
        "run": run.name,
        "points": int(m["points_done"]),
        "wall_minutes": round(minutes, 2),
        "points_per_minute": round(m["points_done"] / minutes, 2),
        "points_per_minute_measuring_only": round(len(measure_s) / (measure_s.sum() / 60), 2),
        "engine_starts": len(starts),
        "engine_start_s_median": round(float(np.median(starts)), 1) if starts else None,
        "engine_start_s_max": round(float(np.max(starts)), 1) if starts else None,
        "harness_over_engine_prefill": round(float(ratio.get("prefill", np.nan)), 3),
        "harness_over_engine_decode": round(float(ratio.get("decode", np.nan)), 3),
        "peak_rss_mb_harness_plus_engine": round(float(s.tel_rss_mb.max()), 0) if "tel_rss_mb" in s else None,
    }
    fig.update({k: round(v, 2) for k, v in repeatability(s).items()})
    fig.update(drift(s))
    return fig


def noise(out: Path, rounds: int, smoke: bool = False, only: list[str] | None = None) -> None:
    size = {"same": 2, "new": 4, "lengths": "[32]"} if smoke else {"same": 8, "new": 32, "lengths": "[64, 512]"}
    if smoke:
        print("--smoke: a check that the benchmark runs; its figures mean nothing", file=sys.stderr)
    rows = []
    plan = [v for v in variants() if not only or v[0] == DEFAULT or any(o in v[0] for o in only)]
    base_env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}
    for rnd in range(rounds):
        order = list(plan)
        random.Random(f"noise:{rnd}").shuffle(order)  # no variant always runs first (or last) in a round
        for label, knobs, env in order:
            with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
                warmup = min(knobs["warmup"], 1) if smoke else knobs["warmup"]
                f.write(NOISE_SPEC.format(**{**knobs, **size, "warmup": warmup}))
            t0 = time.perf_counter()
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            proc = subprocess.run(
                [sys.executable, "-m", "harness.cli", "sweep", "--spec", f.name, "--out", str(out), "--quiet"],
                cwd=ROOT,
                env={**base_env, **env},
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                print(f"{label}: sweep failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            run = max(out.iterdir(), key=lambda p: p.stat().st_mtime)
            s = pd.read_parquet(run / "samples")
            pinning = json.loads((run / "manifest.json").read_text())["engine_starts"][0]["effective"].get(
                "cpu_pinning", {}
            )
            row = {
                "variant": label,
                "round": rnd,
                "wall_s": round(time.perf_counter() - t0, 1),
                **{k: round(v, 3) for k, v in repeatability(s).items()},
                "pinned": bool(pinning.get("applied")),
            }
            row["max_child_rss_mb"] = round(max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not rows:
        sys.exit("noise: every sweep failed")
    df = pd.DataFrame(rows).drop(columns=["round"]).groupby("variant", sort=False).median()
    print(f"\nmedian over {rounds} round(s) per variant:")
    print(df.T.to_string())
    if DEFAULT not in df.index:
        return
    base = df.loc[DEFAULT]
    print("\nguard verdicts (a guard helps when switching it off raises the same-prompt CVs):")
    for label in df.index.drop(DEFAULT):
        off = df.loc[label]
        d_pre = off["prefill_same_prompt_cv_median_pct"] - base["prefill_same_prompt_cv_median_pct"]
        d_dec = off["decode_equal_position_cv_p90_pct"] - base["decode_equal_position_cv_p90_pct"]
        verdict = "helps" if d_pre > 0 and d_dec > 0 else "no clear help" if d_pre <= 0 and d_dec <= 0 else "mixed"
        print(f"  {label}: prefill CV median {d_pre:+.2f} pts, decode CV p90 {d_dec:+.2f} pts vs default -> {verdict}")
    if "telemetry off" in df.index:
        off = df.loc["telemetry off"]
        for label in [x for x in (DEFAULT, "telemetry in a thread") if x in df.index]:
            on = df.loc[label]
            how = "sampler process" if label == DEFAULT else "sampler thread"
            for phase in ("prefill", "decode"):
                r = on[f"{phase}_median_ms"] / off[f"{phase}_median_ms"]
                print(f"telemetry overhead ({how}): median {phase} step with telemetry / without = {r:.4f}")
            cv = on["decode_equal_position_cv_p90_pct"] / off["decode_equal_position_cv_p90_pct"]
            print(f"telemetry overhead ({how}): decode CV p90 with telemetry / without = {cv:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("figures")
    f.add_argument("runs", nargs="+", type=Path)
    n = sub.add_parser("noise")
    n.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-noise")
    n.add_argument("--rounds", "--repeats", type=int, default=3, help="rounds of every variant (median over them)")
    n.add_argument("--smoke", action="store_true", help="tiny sweeps: checks that it runs, figures mean nothing")
    n.add_argument("--only", nargs="+", help="run the default and the variants whose label contains one of these")
    args = ap.parse_args()
    if args.cmd == "figures":
        rows = [run_figures(r) for r in args.runs]
        print(pd.DataFrame(rows).set_index("run").T.to_string())
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        noise(args.out, args.rounds, args.smoke, args.only)


if __name__ == "__main__":
    main()
