"""One engine start that several workloads are driven through in turn (`EngineSession`): what the scheduler and
grid-against-replay experiments share. Every workload on one start sees the same engine-start level, which on a
shared CPU moves by tens of percent between starts (docs/simulate.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from contract.policy import ArrivalPolicy
from contract.request import Request
from harness.drivers.batch import Drive, InFlight
from harness.drivers.plan import SweepOptions
from harness.drivers.replay import plan_replay, replay_spec
from harness.drivers.session import engine_settings, sampling_of, start_engine, warm_up
from harness.engine.vllm_engine import VllmEngine
from harness.rundata.spec import ServingSpec


class EngineSession:
    """One engine start of one config (the CPU ladder's `tier`, top_k 0, blocks 128, `max_num_seqs`, vLLM's
    `scheduling_policy`), warmed up, driving workloads with the harness's `Drive` until `close()`.

    `requests`: every request any later workload holds (the token budget and context are checked against the
    longest). `start_s`: the engine start's seconds; `effective`: its read-back settings."""

    def __init__(self, max_num_seqs: int, requests: Sequence[Request], scheduling_policy: str = "priority",
                 tier: int = 0) -> None:
        serving = ServingSpec(device="cpu", tier=tier, top_k=0, blocks=128, max_num_seqs=max_num_seqs,
                              engine={"scheduling_policy": scheduling_policy})
        self.spec = replay_spec(serving, list(requests))
        self.plan, _, self.cutter = plan_replay(self.spec, list(requests), "experiment")
        self.point = self.plan.points[0]
        self.config = {"tier": tier, "top_k": 0, "blocks": 128}  # the engine config, as the estimator keys it
        self.engine = VllmEngine(engine_settings(self.plan, self.point, SweepOptions()))
        started = start_engine(self.engine, self.spec, self.point)
        self.effective, self.start_s = started.effective, started.seconds
        warm_up(self.engine, self.cutter, self.plan, [self.point])
        self.sampling = sampling_of(self.spec, self.point)
        self.last: Drive | None = None

    def drive(self, requests: Sequence[Request], policy: ArrivalPolicy | None = None, solo: bool = False,
              priorities: Mapping[str, int] | None = None) -> pd.DataFrame:
        """Drive `requests` (arrivals on their own clock from now) to the end; one row per request, with
        `tpot_ms` by vLLM's benchmark's definition. `self.last` keeps the Drive (its iteration rows)."""
        _, prompts, _ = plan_replay(self.spec, list(requests), "experiment")
        inflight = [
            InFlight(r.declaring(priority=(priorities or {}).get(r.request_id, 0)), p.token_ids, p.prompt_id,
                     start_s=r.arrival_s, sampling=self.sampling, workload_clock=True)
            for r, p in zip(requests, prompts, strict=True)  # plan_replay: one prompt per request, in order
        ]
        self.last = Drive(self.engine, inflight, policy=policy, solo=solo).run()
        frame = pd.DataFrame(self.last.request_rows({}))
        frame["tpot_ms"] = (frame["e2e_ms"] - frame["ttft_ms"]) / (frame["new_tokens"] - 1).clip(lower=1)
        return frame

    def close(self) -> None:
        self.engine.close()
