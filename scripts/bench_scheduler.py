"""Scheduling by predicted latency on the real engine (issue 22): the same arrival traces under each policy.

python scripts/bench_scheduler.py run MODEL_DIR ENGINE_RUN --out DIR [--rates 0.9,1.3] [--seeds 1,2] [--count 80]
    [--max-num-seqs 4] [--policies fcfs,prompt,estimate]
    MODEL_DIR: an iteration model (estimate train RUN --target iteration); ENGINE_RUN: a run whose manifest gives
    the engine's settings. A bimodal workload (70% short prompts 32-96 tokens with 4-12 new tokens, 30% long prompts
    768-1024 with 48-64), Poisson arrivals at each multiple of the config's capacity (the simulator's saturated
    throughput at --max-num-seqs), one trace per (rate, seed), shared by every policy. Each policy sets every
    request's priority at arrival (vLLM's priority policy, lower first):
      fcfs      no priorities (vLLM's default FCFS);
      prompt    shortest prompt first (priority = text_tokens);
      estimate  shortest predicted request latency first: the request alone through the scheduler replica and the
                iteration model (its decision cost is timed per request).
    Each (rate, seed, policy) is one `profile replay --policy ...` on the real engine. Prints per policy and rate
    the SLO attainment (both the TTFT and the TPOT SLO: 3x and 1.5x the class's median TTFT and TPOT in the
    lowest-rate FCFS runs), mean and p99 end-to-end latency, goodput (the highest rate with >= 90% attainment),
    and the decision cost; min-max over seeds. Writes DIR/results.json.
Run it alone on the machine: every replay is a timed measurement.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from estimator.data.runs import read_manifest  # noqa: E402
from estimator.model.iteration import IterationEstimator  # noqa: E402
from estimator.sim.scheduler import Arrival, simulate  # noqa: E402
from estimator.sim.workload import engine_config_from_manifest, iteration_fn  # noqa: E402
from traffic.workload import WorkloadRequest, write_workload  # noqa: E402

SHORT, LONG = ((32, 96), (4, 12)), ((768, 1024), (48, 64))
SLO_TTFT_X, SLO_TPOT_X = 3.0, 1.5


def bimodal(rate: float, count: int, seed: int) -> list[WorkloadRequest]:
    """70% short, 30% long requests, Poisson arrivals at `rate`; deterministic for a seed."""
    rng = random.Random(f"bimodal:{seed}")
    t, out = 0.0, []
    for i in range(count):
        if i:
            t += rng.expovariate(rate)
        (p_lo, p_hi), (n_lo, n_hi) = SHORT if rng.random() < 0.7 else LONG
        out.append(WorkloadRequest(i, round(t, 6), rng.randint(p_lo, p_hi), rng.randint(n_lo, n_hi)))
    return out


def capacity(model: IterationEstimator, config: dict[str, Any], engine: Any, count: int = 400) -> float:
    """Saturated throughput (requests/s) of the bimodal mix in the replica: every request at time 0."""
    reqs = bimodal(1e6, count, 99)
    run = simulate(
        [Arrival(r.request_id, 0.0, r.text_tokens, r.new_tokens) for r in reqs], engine, iteration_fn(model, config)
    )
    return count / run.end_s


def estimate_priorities(
    reqs: list[WorkloadRequest], model: IterationEstimator, config: dict[str, Any], engine: Any
) -> tuple[list[int], float]:
    """Each request's predicted latency alone (µs, the priority) and the mean decision cost (µs per request)."""
    fn = iteration_fn(model, config)
    out, t0 = [], time.perf_counter()
    for r in reqs:
        run = simulate([Arrival(r.request_id, 0.0, r.text_tokens, r.new_tokens)], engine, fn)
        out.append(round(run.requests[0].token_times_s[-1] * 1e6))
    return out, (time.perf_counter() - t0) / len(reqs) * 1e6


def simulated(
    args: argparse.Namespace,
    model: IterationEstimator,
    config: dict[str, Any],
    engine: Any,
    cap: float,
    slo: dict[bool, tuple[float, float]],
) -> list[dict[str, Any]]:
    """SIMULATED, not measured: the same traces in the replica under FCFS, the estimate policy as vLLM runs it
    (priority orders the waiting queue only) and with preemptive priority (what vLLM does not do, issue #40004).
    Prints SLO attainment per rate (mean over seeds)."""
    from dataclasses import replace

    fn = iteration_fn(model, config)
    rows = []
    for mult in args.rates:
        for seed in args.seeds:
            base = bimodal(mult * cap, args.count, seed)
            prio, _ = estimate_priorities(base, model, config, engine)
            for name, eng, pr in (
                ("fcfs", engine, [0] * len(base)),
                ("estimate", replace(engine, policy="priority"), prio),
                ("estimate, preemptive", replace(engine, policy="priority", preemptive_priority=True), prio),
            ):
                run = simulate(
                    [
                        Arrival(r.request_id, r.arrival_s, r.text_tokens, r.new_tokens, p)
                        for r, p in zip(base, pr, strict=True)
                    ],
                    eng,
                    fn,
                )
                ok = 0
                for tr in run.requests:
                    a = tr.arrival
                    ttft = (tr.token_times_s[0] - a.arrival_s) * 1e3
                    e2e = (tr.token_times_s[-1] - a.arrival_s) * 1e3
                    tpot = (e2e - ttft) / max(a.output_tokens - 1, 1)
                    lim = slo[a.prompt_tokens >= LONG[0][0]]
                    ok += ttft <= lim[0] and tpot <= lim[1]
                rows.append({"policy": name, "mult": mult, "seed": seed, "attainment": ok / len(base)})
    frame = pd.DataFrame(rows)
    print("SIMULATED (the replica, not the engine): SLO attainment % by policy and rate x capacity")
    for (name, mult), g in frame.groupby(["policy", "mult"], sort=False):
        print(f"  {name} | {mult:g} | {g.attainment.mean() * 100:.0f}")
    return rows


def replay(workload: Path, policy: str, out: Path, name: str, max_num_seqs: int) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "harness.cli",
        "replay",
        "--workload",
        str(workload),
        "--policy",
        policy,
        "--max-num-seqs",
        str(max_num_seqs),
        "--out",
        str(out),
        "--name",
        name,
        "--quiet",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"replay {name} failed ({res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
    return out / name


def run(args: argparse.Namespace) -> None:
    model = IterationEstimator.load(args.model)
    engine = engine_config_from_manifest(read_manifest(args.engine))
    engine = type(engine)(**{**engine.__dict__, "max_num_seqs": args.max_num_seqs})
    config = dict(model.trained_configs[0])
    cap = capacity(model, config, engine)
    print(f"capacity (replica, bimodal mix, max_num_seqs {args.max_num_seqs}): {cap:.2f} req/s")
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    costs: dict[str, float] = {"fcfs": 0.0, "prompt": 0.0}
    for mult in args.rates:
        for seed in args.seeds:
            base = bimodal(mult * cap, args.count, seed)
            for policy in args.policies:
                if policy == "estimate":
                    prio, cost = estimate_priorities(base, model, config, engine)
                    costs["estimate"] = cost
                    reqs = [
                        WorkloadRequest(r.index, r.arrival_s, r.text_tokens, r.new_tokens, None, p)
                        for r, p in zip(base, prio, strict=True)
                    ]
                    flag = "file"
                else:
                    reqs, flag = base, policy
                wl = args.out / f"w-{mult:g}-{seed}-{policy}.jsonl"
                write_workload(wl, reqs)
                name = f"{policy}-{mult:g}-{seed}"
                print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
                run_dir = replay(wl, flag, args.out / "runs", name, args.max_num_seqs)
                req = pd.read_parquet(run_dir / "requests")
                req["tpot_ms"] = (req["e2e_ms"] - req["ttft_ms"]) / (req["new_tokens"] - 1).clip(lower=1)
                req["long"] = req["text_tokens"] >= LONG[0][0]
                results.append({"policy": policy, "mult": mult, "seed": seed, "requests": req})
    low = min(args.rates)
    ref = pd.concat([r["requests"] for r in results if r["policy"] == "fcfs" and r["mult"] == low])
    slo = {
        bool(k): (SLO_TTFT_X * g["ttft_ms"].median(), SLO_TPOT_X * g["tpot_ms"].median())
        for k, g in ref.groupby("long")
    }
    print(
        f"SLOs (TTFT ms, TPOT ms): short {slo[False][0]:.0f}, {slo[False][1]:.1f}; long {slo[True][0]:.0f}, "
        f"{slo[True][1]:.1f} ({SLO_TTFT_X:g}x / {SLO_TPOT_X:g}x the class median at {low:g}x capacity, FCFS)"
    )
    table: list[dict[str, Any]] = []
    for r in results:
        q = r["requests"]
        lim = q["long"].map(lambda x: slo[bool(x)])
        ok = (q["ttft_ms"] <= lim.map(lambda v: v[0])) & (q["tpot_ms"] <= lim.map(lambda v: v[1]))
        table.append(
            {
                "policy": r["policy"],
                "mult": r["mult"],
                "seed": r["seed"],
                "attainment": float(ok.mean()),
                "e2e_mean_ms": float(q["e2e_ms"].mean()),
                "e2e_p99_ms": float(q["e2e_ms"].quantile(0.99)),
            }
        )
    frame = pd.DataFrame(table)
    print("policy | rate x cap | SLO attainment % (min-max over seeds) | E2E mean ms | E2E p99 ms")
    for (policy, mult), g in frame.groupby(["policy", "mult"]):
        print(
            f"{policy} | {mult:g} | {g.attainment.mean() * 100:.0f} ({g.attainment.min() * 100:.0f}-"
            f"{g.attainment.max() * 100:.0f}) | {g.e2e_mean_ms.mean():.0f} | {g.e2e_p99_ms.mean():.0f}"
        )
    for policy, g in frame.groupby("policy"):
        per_seed = []
        for _seed, gs in g.groupby("seed"):
            ok = gs[gs.attainment >= 0.9]["mult"]
            per_seed.append(float(ok.max()) * cap if len(ok) else 0.0)
        print(
            f"goodput {policy}: {statistics.mean(per_seed):.2f} req/s (seeds {per_seed}); decision cost "
            f"{costs.get(policy, 0.0):.1f} us/request"
        )
    sim_rows = simulated(args, model, config, engine, cap, slo)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "capacity_rps": cap,
                "slo": {str(k): v for k, v in slo.items()},
                "rows": table,
                "decision_cost_us": costs,
                "simulated": sim_rows,
            },
            indent=1,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("model", type=Path)
    r.add_argument("engine", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.9, 1.3])
    r.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    r.add_argument("--policies", type=lambda s: s.split(","), default=["fcfs", "prompt", "estimate"])
    r.add_argument("--count", type=int, default=80)
    r.add_argument("--max-num-seqs", type=int, default=4)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
