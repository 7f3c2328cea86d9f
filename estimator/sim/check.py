"""The scheduler replica against a recorded replay: fed the replay's measured iteration windows, does it put the
same requests in each iteration, with the same prefill tokens?

Clocks. The engine core runs in its own process and does not wait for the harness: it starts iteration k as soon
as k-1 is done, while the harness is still collecting k-1's outputs and adding the requests that arrived meanwhile.
So an iteration is placed on the core's clock: it starts at min(its end - the core's own elapsed time, the end of
the iteration before), and ends at its end as the harness saw it. A request reaches the core a little after the
harness's `add_request` returned (inter-process messaging: under load on 2 cores, up to several ms): it is visible
to the replica `allowance_s` after that, and no later than the start of the iteration that first scheduled it (the
core had it by then). What is checked is the scheduler's decisions from the moment the core could see a request:
which requests share an iteration, in which role, and how many prompt tokens each chunk takes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.request import Request
from estimator.data.runs import read_manifest, read_parquet_folder, served_requests
from estimator.errors import EstimatorError
from estimator.sim.scheduler import simulate
from estimator.sim.workload import engine_config_from_manifest


@dataclass(frozen=True)
class Agreement:
    """How many of a replay's iterations the replica reproduced (same prefilling and decoding requests, same
    prefill tokens), and the first that differed."""

    iterations: int
    matched: int
    first_mismatch: str | None

    @property
    def share(self) -> float:
        return self.matched / self.iterations if self.iterations else float("nan")


def replica_agreement(run_dir: Path, allowance_s: float = 0.01) -> Agreement:
    """Replay each segment of a replay run through the replica on the core's clock (see the module docstring and
    `simulate`'s `measured_windows`) and compare the compositions iteration by iteration."""
    manifest = read_manifest(run_dir)
    if manifest.get("kind") != "replay":
        raise EstimatorError(f"{run_dir}: not a replay run")
    engine = engine_config_from_manifest(manifest)
    its = read_parquet_folder(run_dir / "iterations")
    reqs = served_requests(run_dir)
    if its.empty or reqs.empty:
        raise EstimatorError(f"{run_dir}: no iterations or requests")
    total = matched = 0
    first: str | None = None
    for seg, rq in reqs.groupby("segment_id", sort=True):
        it = its[its["segment_id"] == seg].sort_values("iteration")
        t0 = float(np.median(rq["arrival_t_s"] - rq["arrival_s"]))
        core_ms = it["engine_elapsed_ms"].astype("float64").fillna(it["latency_ms"]).to_numpy()
        end = (it["t_end_s"] - t0).to_numpy()
        start = np.minimum(end - core_ms / 1e3, np.r_[-np.inf, end[:-1]])
        position = {int(i): k for k, i in enumerate(it["iteration"])}
        arrivals = []
        for r in rq.sort_values("arrival_s").itertuples():
            seen = float(r.arrival_s) + float(r.add_lag_ms) / 1e3 + allowance_s
            pos = position.get(int(r.first_iteration))
            if pos is not None:
                seen = min(seen, float(start[pos]))
            arrivals.append(Request.make(str(r.request_id), seen, int(r.text_tokens), int(r.new_tokens)))
        windows = list(zip(start.tolist(), end.tolist(), strict=True))
        run = simulate(arrivals, engine, lambda *_: 1.0, measured_windows=windows, keep_steps=True)
        for row, step in zip(it.itertuples(), run.steps, strict=False):
            ids = str(row.request_ids).split(",") if row.request_ids else []
            n_pre = int(row.num_prefill_seqs)
            want = (sorted(ids[:n_pre]), sorted(ids[n_pre:]), int(row.prefill_tokens))
            got = (
                sorted(r for r, _, _ in step.prefill),
                sorted(r for r, _ in step.decode),
                sum(n for _, n, _ in step.prefill),
            )
            total += 1
            if want == got:
                matched += 1
            elif first is None:
                first = f"{seg} iteration {row.iteration}: recorded {want}, replica {got}"
        total += max(0, len(it) - len(run.steps))
    return Agreement(total, matched, first)
