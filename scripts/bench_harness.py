"""Harness benchmark: throughput, overhead and measurement repeatability (prints figures; not a test).

python scripts/bench_harness.py figures RUN_DIR [RUN_DIR ...]
    from finished runs (e.g. the default sweep): points per minute, engine start times, harness step time vs
    the engine core's own iteration time, peak memory, and repeatability (same-prompt prefill CV, decode CV at
    equal position).
python scripts/bench_harness.py noise [--out DIR] [--repeats N]
    runs the same short sweep with each noise guard switched off in turn (garbage-collection guard, warm-up,
    telemetry sampler, OMP thread binding) and prints the repeatability figures side by side, so the effect
    of each guard is measured in one run on one machine. The telemetry row is also issue 3's overhead figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
NOISE_SPEC = """
reps = 2
same_prompt_repeats = 8
max_new_tokens = 32
warmup_requests = {warmup}
telemetry = {telemetry}
gc_guard = {gc_guard}
[axes]
tier = [0]
blocks = [32]
top_k = [0]
text_tokens = [64, 512]
"""
VARIANTS: list[tuple[str, dict[str, Any], dict[str, str]]] = [
    ("all guards on (default)", {"warmup": 3, "telemetry": "true", "gc_guard": "true"}, {}),
    ("gc guard off", {"warmup": 3, "telemetry": "true", "gc_guard": "false"}, {}),
    ("no warm-up", {"warmup": 0, "telemetry": "true", "gc_guard": "true"}, {}),
    ("telemetry off", {"warmup": 3, "telemetry": "false", "gc_guard": "true"}, {}),
    (
        "OMP threads on both cores",
        {"warmup": 3, "telemetry": "true", "gc_guard": "true"},
        {"VLLM_CPU_OMP_THREADS_BIND": "0-1"},
    ),
]


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


def run_figures(run: Path) -> dict[str, Any]:
    m = json.loads((run / "manifest.json").read_text())
    s = pd.read_parquet(run / "samples")
    t0 = dt.datetime.fromisoformat(m["started_at"])
    t1 = dt.datetime.fromisoformat(m["ended_at"]) if m.get("ended_at") else t0
    minutes = max((t1 - t0).total_seconds() / 60, 1e-9)
    starts = [e["seconds"] for e in m.get("engine_starts", [])]
    measure_s = s.groupby("point_id").t_end_s.max() - s.groupby("point_id").t_start_s.min()
    ok = s.engine_elapsed_ms.notna() & (s.engine_elapsed_ms > 0)
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
    return fig


def noise(out: Path, repeats: int) -> None:
    rows = []
    for rep in range(repeats):
        for label, knobs, env in VARIANTS:
            with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
                f.write(NOISE_SPEC.format(**knobs))
            t0 = time.perf_counter()
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            proc = subprocess.run(
                [sys.executable, "-m", "harness.cli", "sweep", "--spec", f.name, "--out", str(out), "--quiet"],
                cwd=ROOT,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                print(f"{label}: sweep failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            run = max(out.iterdir(), key=lambda p: p.stat().st_mtime)
            s = pd.read_parquet(run / "samples")
            row = {
                "variant": label,
                "round": rep,
                "wall_s": round(time.perf_counter() - t0, 1),
                **{k: round(v, 3) for k, v in repeatability(s).items()},
            }
            row["max_child_rss_mb"] = round(max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024)
            rows.append(row)
            print(json.dumps(row), flush=True)
    df = pd.DataFrame(rows).drop(columns=["round"]).groupby("variant", sort=False).median()
    print()
    print(df.T.to_string())
    base = df.loc["all guards on (default)"]
    if "telemetry off" in df.index:
        for phase in ("prefill", "decode"):
            r = base[f"{phase}_median_ms"] / df.loc["telemetry off", f"{phase}_median_ms"]
            print(f"telemetry overhead: median {phase} step with telemetry / without = {r:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("figures")
    f.add_argument("runs", nargs="+", type=Path)
    n = sub.add_parser("noise")
    n.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-noise")
    n.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    if args.cmd == "figures":
        rows = [run_figures(r) for r in args.runs]
        print(pd.DataFrame(rows).set_index("run").T.to_string())
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        noise(args.out, args.repeats)


if __name__ == "__main__":
    main()
