"""`estimate simulate` benchmarks (print figures; not tests).

python scripts/bench_simulate.py speed MODEL_DIR ENGINE_RUN [--count 10000]
    seconds to simulate COUNT requests (one process, one thread), and an 8-rate capacity curve of 1,000 requests
    each. Targets (issue 21): 10,000 requests <= 2 s on one core; 8 rates <= 20 s.
python scripts/bench_simulate.py validate MODEL_DIR RUN... [--json FILE] [--plots DIR]
    the simulator (with MODEL_DIR's serving.json) against measured replay / serve-bench runs: per run and per
    workload kind (the run name up to its last '-'), per-request end-to-end and TTFT MAPE, and the error of the
    mean / p50 / p90 / p99 of TTFT, TPOT and end-to-end (%, 95% bootstrap interval over requests), plus the
    SLO attainment measured and simulated at SLOs of 2x the workload's median TTFT and TPOT. --calibrate
    (replays): the oracle experiment, the iteration model scaled by each run's own engine-start speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contract.workload import LengthDist, generate_workload  # noqa: E402
from estimator.data.runs import read_manifest  # noqa: E402
from estimator.model.iteration import IterationEstimator  # noqa: E402
from estimator.sim.measured import cdf_plot  # noqa: E402
from estimator.sim.validation import ci_text, save_validation, validate_simulation  # noqa: E402
from estimator.sim.workload import Overheads, capacity_curve, engine_config_from_manifest, run_workload  # noqa: E402


def speed(args: argparse.Namespace) -> None:
    model = IterationEstimator.load(args.model)
    engine = engine_config_from_manifest(read_manifest(args.engine))
    config = dict(model.trained_configs[0])
    texts, news = LengthDist.parse("uniform:32:512", "t"), LengthDist.parse("uniform:8:64", "n")
    reqs = generate_workload(args.rate, args.count, 0, texts, news, engine.max_model_len)
    run_workload(reqs[:200], engine, model, config, Overheads())  # warm
    t0 = time.perf_counter()
    frame, run = run_workload(reqs, engine, model, config, Overheads())
    one = time.perf_counter() - t0
    print(
        f"{args.count} requests at {args.rate:g} req/s: {run.iterations} iterations simulated in {one:.2f} s "
        f"({one / args.count * 1e6:.0f} us per request; target <= 2 s)"
    )
    rates = list(np.linspace(args.rate / 4, args.rate * 2, 8))
    t0 = time.perf_counter()
    capacity_curve(
        rates,
        lambda r: generate_workload(r, 1000, 0, texts, news, engine.max_model_len),
        lambda q: run_workload(q, engine, model, config, Overheads())[0],
        1000.0,
        50.0,
    )
    print(f"capacity curve, 8 rates x 1000 requests: {time.perf_counter() - t0:.2f} s (target <= 20 s)")


def validate(args: argparse.Namespace) -> None:
    result, pooled = validate_simulation(args.model, args.runs, calibrate=args.calibrate)
    o = result.overheads
    print(
        f"overheads: per iteration {o['iteration_ms']:.3f} ms, per sequence {o['sequence_ms']:.3f} ms, "
        f"per request {o['request_ms']:.2f} ms "
        f"(fitted on {o['fitted_on'] or 'nothing'})"
    )
    print(
        "run | source | n | E2E MAPE | E2E mean | E2E p90 | E2E p99 | TTFT MAPE | TTFT mean | TTFT p90 | "
        "TPOT mean | SLO met measured / simulated | targets"
    )
    for r in result.rows:
        print(
            f"{r.name} | {r.source} | {r.requests} | {r.e2e_mape.value:.1f} | {ci_text(r.e2e['mean'])} | "
            f"{ci_text(r.e2e['p90'])} | {ci_text(r.e2e['p99'])} | {r.ttft_mape.value:.1f} | "
            f"{ci_text(r.ttft['mean'])} | {ci_text(r.ttft['p90'])} | {ci_text(r.tpot['mean'])} | "
            f"{r.slo_measured_pct:.0f}% / {r.slo_simulated_pct:.0f}% | {'met' if r.meets_targets() else 'missed'}"
        )
    if args.json:
        save_validation(result, args.json)
        print(f"wrote {args.json}")
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        for key, pairs in pooled.items():
            cdf_plot(pairs, args.plots / f"cdf-{key.replace(':', '-')}.png", f"{key}: simulated vs measured")
        print(f"wrote {len(pooled)} CDF plots to {args.plots}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("model", type=Path)
    s.add_argument("engine", type=Path)
    s.add_argument("--count", type=int, default=10_000)
    s.add_argument("--rate", type=float, default=8.0)
    v = sub.add_parser("validate")
    v.add_argument("model", type=Path)
    v.add_argument("runs", type=Path, nargs="+")
    v.add_argument("--json", type=Path, help="write the rows here (for estimate report --simulation)")
    v.add_argument("--plots", type=Path, help="folder for CDF plots, one per workload kind")
    v.add_argument(
        "--calibrate",
        action="store_true",
        help="replays: scale the iteration model by each run's own "
        "engine-start speed (an oracle: how much error is the engine start's speed)",
    )
    args = parser.parse_args()
    speed(args) if args.cmd == "speed" else validate(args)


if __name__ == "__main__":
    main()
