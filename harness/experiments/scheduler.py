"""Scheduling by predicted latency on the real engine: the same arrival traces under every policy.

    profile experiment scheduler MODEL_DIR --out DIR [--mix classes] [--mults 0.5,0.7,0.9,1.1,1.3] [--seeds 1,2,3]
        [--count 80] [--max-num-seqs 4] [--policies fcfs,prompt,estimate,estimate-admit,oracle] [--slo-scale K]
    estimate experiment scheduler DIR [--slo-scale K]      # the statistics again from DIR's raw rows

MODEL_DIR: an iteration model (`estimate train RUN --target iteration`; its `serving.json` overheads are used).
One engine start (cpu-tiny, tier 0, `--max-num-seqs`, vLLM's priority scheduling policy) serves everything, so an
engine start's speed (which varies by +-30% between starts on a 2-core VM, docs/simulate.md) is the same for
every policy; the policies are interleaved per trace in a rotating order:
0. the mix (contract/workload.py MIXES: `bimodal`, `independent`, `classes`): every client declares the cap
   (`max_tokens` 256) and, in `classes`, its class label; the engine stops each request at its true length. The
   output-length training trace, DIR/lengths-train.jsonl, is the mix's seed TRAIN_SEED (never an evaluated seed):
   the estimate policies learn the output length from it (estimator/sim/lengths.py);
1. capacity: a burst of `count` requests of the mix (seed 0) at t = 0 (FCFS); capacity = requests / makespan;
2. alone: each seed's requests one at a time (`Drive(solo=True)`): each request's latency alone (the oracle's
   priorities) and the SLOs: per class (the declared class label, else short/long prompt), TTFT and TPOT SLO = K x
   the class's median TTFT and TPOT alone, K chosen before any policy runs (`estimate experiment scheduler DIR
   --set-slo`: from the replica, not from measured policy results);
3. traces: per seed, one request set of the mix (contract/workload.py `mix_requests`), Poisson arrivals at each multiple
   of the measured capacity (the same unit-rate draws scaled, so every rate and every policy sees the same
   requests in the same order). Policies:
     fcfs            no priorities: vLLM's priority policy with equal priorities orders by arrival (its FCFS);
     prompt          shortest prompt first (priority = prompt tokens);
     estimate        shortest predicted latency alone first (the installed `estimate` policy, decided at arrival,
                     with the output length predicted from the declaration, not known);
     estimate-admit  the same, and a request predicted (from the engine's state at its arrival) to miss its
                     class's TTFT or end-to-end SLO is rejected at arrival;
     oracle          the request's end-to-end latency measured alone (step 2) as its priority: the only policy
                     that knows the true output length.
DIR/raw/ keeps every request row, so the analysis reruns; a killed run resumes the cells it has not finished.
The analysis also writes DIR/requests.parquet, the rows it reads in one compact file: a study commits that (and
setup.json, alone.parquet, lengths-train.jsonl), and a clone without raw/ resumes after the cells it holds.
The harness never imports the estimator: the estimate policies come through the contract's policy registry, and
the SLO choice and the statistics run as `estimate experiment scheduler` over DIR's files. Run it alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from contract.policy import ArrivalPolicy, Decision, Held, load_registered
from contract.request import Declared
from contract.workload import MIXES, mix_requests, slo_entries, write_workload
from harness.experiments.session import EngineSession
from harness.rundata.spec import SpecError

POLICIES = ("fcfs", "prompt", "estimate", "estimate-admit", "oracle")
TRAIN_SEED = 10_000  # the output-length training trace's seed: the evaluated seeds must stay below it
TRAIN_COUNT = 2_000


class Static:
    """A priority known before arrival (prompt length, or the oracle's latency alone): a dict lookup per arrival."""

    def __init__(self, name: str, priorities: Mapping[str, int]) -> None:
        self.name, self.priorities = name, dict(priorities)

    def start(self, engine: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        pass

    def decide(self, request: Declared, held: Sequence[Held]) -> Decision:
        return Decision(priority=self.priorities[request.request_id])


@dataclass
class SchedulerSpec:
    """The experiment's settings (see the module docstring)."""

    model: Path
    out: Path
    mix: str = "classes"
    mults: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9, 1.1, 1.3])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    count: int = 80
    max_num_seqs: int = 4
    slo_scale: float | None = None

    def check(self) -> None:
        bad = [p for p in self.policies if p not in POLICIES]
        if self.mix not in MIXES:
            raise SpecError(f"--mix must be one of {', '.join(MIXES)}, got {self.mix!r}")
        if any(not 0 < s < TRAIN_SEED for s in self.seeds):
            raise SpecError(f"--seeds must lie in 1..{TRAIN_SEED - 1} (seed {TRAIN_SEED} trains the output lengths)")
        if bad or "fcfs" not in self.policies:
            raise SpecError(f"--policies: from {', '.join(POLICIES)}, fcfs included (got {','.join(self.policies)})")
        if not self.mults or min(self.mults) <= 0 or not self.seeds or self.count < 2 or self.max_num_seqs < 1:
            raise SpecError("--mults must be positive rates, --seeds non-empty, --count >= 2, --max-num-seqs >= 1")
        if not (self.model / "iteration.json").is_file():
            raise SpecError(f"{self.model} is not an iteration model (no iteration.json): estimate train RUN "
                            "--target iteration")


def estimator_step(args: list[str], say: Callable[[str], None]) -> None:
    """Run `estimate experiment scheduler ARGS` (the estimator's side, through files) and pass its output on."""
    proc = subprocess.run([sys.executable, "-m", "estimator.cli", "experiment", "scheduler", *args],
                          capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        say(line)
    if proc.returncode != 0:
        raise SpecError(f"estimate experiment scheduler {' '.join(args)} failed: "
                        f"{(proc.stderr.strip().splitlines() or ['no message'])[-1]}")


def done_cells(out: Path) -> set[tuple[str, float, int]]:
    """(policy, rate multiple, seed) of the cells kept in `out/requests.parquet` (the compact rows the estimator's
    analysis writes and a study commits): measured already, so a clone without `raw/` resumes after them."""
    path = out / "requests.parquet"
    if not path.is_file():
        return set()
    frame = pd.read_parquet(path, columns=["policy", "mult", "seed"]).drop_duplicates()
    return {(str(p), float(m), int(s)) for p, m, s in zip(frame["policy"], frame["mult"], frame["seed"], strict=True)}


def run_scheduler(spec: SchedulerSpec, say: Callable[[str], None] = print) -> None:
    """Measure (capacity, alone, every trace under every policy) into spec.out, then the estimator's analysis."""
    spec.check()
    out = spec.out
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    setup_file = out / "setup.json"
    sets = {seed: mix_requests(spec.mix, 1.0, spec.count, seed) for seed in [0, *spec.seeds]}
    everything = [r for s in sets.values() for r in s]
    cells = [(seed, mult) for seed in spec.seeds for mult in spec.mults]
    kept = done_cells(out)

    def measured(policy: str, mult: float, seed: int) -> bool:  # in raw/, or kept in requests.parquet
        return (raw / f"{policy}-{mult:g}-{seed}.parquet").is_file() or (policy, mult, seed) in kept

    todo = [(s, m, p) for s, m in cells for p in spec.policies if not measured(p, m, s)]
    setup = json.loads(setup_file.read_text()) if setup_file.is_file() else {}
    held_mix = setup.get("mix", {}).get("name", "bimodal, declared = true length (before mixes)")
    if setup and held_mix != spec.mix:
        raise SpecError(f"{out} holds the mix {held_mix}, not {spec.mix}: use another --out")
    lengths = out / "lengths-train.jsonl"
    if not lengths.is_file():
        write_workload(lengths, mix_requests(spec.mix, 1.0, TRAIN_COUNT, TRAIN_SEED))
    if not todo and "slo" in setup:
        say(f"every cell of {out} is measured: the analysis only")
        estimator_step([str(out)], say)
        return
    t_begin = time.time()
    session = EngineSession(spec.max_num_seqs, everything)
    say(f"engine start {session.start_s:.1f} s; effective max_num_seqs {session.effective.get('max_num_seqs')}, "
        f"dtype {session.effective.get('dtype')}")
    try:
        if "capacity_rps" not in setup:
            burst = [r.declaring(arrival_s=0.0) for r in sets[0]]
            frame = session.drive(burst)
            span = float((frame["arrival_t_s"] + frame["e2e_ms"] / 1e3).max() - frame["arrival_t_s"].min())
            alone = [session.drive(sets[seed], solo=True).assign(seed=seed) for seed in spec.seeds]
            pd.concat(alone, ignore_index=True).to_parquet(out / "alone.parquet")
            setup.update({"mix": MIXES[spec.mix].describe(), "lengths": lengths.name, "train_seed": TRAIN_SEED,
                          "capacity_rps": len(frame) / span, "engine": session.effective,
                          "engine_start_s": session.start_s, "count": spec.count, "max_num_seqs": spec.max_num_seqs,
                          "model": str(spec.model), "config": session.config, "seeds": spec.seeds,
                          "mults": spec.mults})
            setup_file.write_text(json.dumps(setup, indent=1, default=str))
        elif added := sorted(set(spec.mults) - set(setup.get("mults", []))):  # the grid extended on a later start
            setup["mults"] = sorted({*setup.get("mults", []), *spec.mults})
            setup.setdefault("later_starts", []).append({"engine_start_s": session.start_s, "mults_added": added})
            setup_file.write_text(json.dumps(setup, indent=1, default=str))
        if "slo" not in setup:  # chosen by the estimator from the replica, before any policy runs
            estimator_step([str(out), "--set-slo", *(["--slo-scale", str(spec.slo_scale)] if spec.slo_scale else [])],
                           say)
            setup = json.loads(setup_file.read_text())
        cap, slo = setup["capacity_rps"], setup["slo"]
        say(f"capacity (measured burst, mix {spec.mix}, max_num_seqs {spec.max_num_seqs}): {cap:.2f} req/s")
        say(f"SLOs ({setup['slo_scale']:g}x alone, {setup['slo_scale_rule']}): " + "; ".join(
            f"{k} TTFT {v['ttft_ms']:.0f} ms, TPOT {v['tpot_ms']:.1f} ms (alone {v['alone_ttft_ms']:.0f} / "
            f"{v['alone_tpot_ms']:.1f})" for k, v in slo.items()))
        alone_frame = pd.read_parquet(out / "alone.parquet")
        oracle_us = {(int(s), str(k)): round(float(v) * 1e3)
                     for s, k, v in zip(alone_frame["seed"], alone_frame["request_id"], alone_frame["e2e_ms"],
                                        strict=True)}
        slo_args = slo_entries(slo)
        learned = {"model": str(spec.model), "lengths": str(lengths)}
        for k, (seed, mult) in enumerate(cells):
            policies = spec.policies[k % len(spec.policies):] + spec.policies[: k % len(spec.policies)]  # rotate
            for policy in policies:
                if measured(policy, mult, seed):
                    continue
                part = raw / f"{policy}-{mult:g}-{seed}.parquet"
                reqs = [r.declaring(arrival_s=r.arrival_s / (mult * cap)) for r in sets[seed]]
                live: ArrivalPolicy | None = None
                if policy == "prompt":
                    live = Static("prompt", {r.request_id: r.text_tokens for r in reqs})
                elif policy == "oracle":
                    live = Static("oracle", {r.request_id: oracle_us[(seed, r.request_id)] for r in reqs})
                elif policy == "estimate":
                    live = load_registered("estimate", learned)
                elif policy == "estimate-admit":
                    live = load_registered("estimate-admit", {**learned, "slo": slo_args})
                if live is not None:
                    live.start(session.effective, session.config)
                say(f"[{time.strftime('%H:%M:%S')}] {policy} x{mult:g} seed {seed}")
                frame = session.drive(reqs, policy=live)
                frame.assign(policy=policy, mult=mult, seed=seed, rate_rps=mult * cap).to_parquet(part)
    finally:
        session.close()
    say(f"engine time {time.time() - t_begin:.0f} s")
    estimator_step([str(out)], say)
