"""Scheduling policies of a replay (`profile replay --policy`): each request's priority at its arrival.

vLLM's priority policy (`scheduling_policy="priority"`, lower first) orders only the waiting queue: a running
request is not preempted by an arrival (vLLM issue #40004; docs/vllm-notes.md).

- `fcfs`: vLLM's default, no priorities;
- `prompt`: shortest prompt first (priority = text_tokens);
- `file`: the workload's own `priority` values;
- `oracle`: the request's end-to-end latency measured alone (µs), from a solo run of the same workload
  (`profile replay --solo`): an upper reference no scheduler has;
- `estimate`, `estimate-admit`: decided at arrival by a policy installed under contract.policy's entry-point group
  (the estimator's: shortest predicted latency first; with admission, a request whose predicted TTFT or
  end-to-end latency on the engine's current state misses its SLO is rejected). The harness finds them by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contract.policy import ArrivalPolicy, PolicyError, load_registered
from contract.request import Request
from harness.rundata.spec import ServingSpec, SpecError
from harness.rundata.store import RunStore

STATIC = ("fcfs", "prompt", "file", "oracle")
LIVE = ("estimate", "estimate-admit")
POLICIES = STATIC + LIVE


def apply_policy(
    policy: str, serving: ServingSpec, workload: list[Request], oracle_run: Path | None = None
) -> tuple[list[Request], ServingSpec]:
    """The workload with each request's priority under a static `policy` (none for `fcfs` and the live ones,
    which decide at arrival), and the serving spec with vLLM's priority policy for every policy but `fcfs`."""
    if policy not in POLICIES:
        raise SpecError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if policy == "fcfs":
        return [r.declaring(priority=None) for r in workload], serving
    if policy == "file":
        missing = [r.index + 1 for r in workload if r.priority is None]
        if missing:
            raise SpecError(f"--policy file: workload line {missing[0]} has no priority")
        out = workload
    elif policy == "prompt":
        out = [r.declaring(priority=r.text_tokens) for r in workload]
    elif policy == "oracle":
        alone = solo_latencies_us(oracle_run)
        unmeasured = [r.request_id for r in workload if r.request_id not in alone]
        if unmeasured:
            raise SpecError(f"--oracle-run {oracle_run}: no finished request {unmeasured[0]} (run the same workload "
                            "with profile replay --solo)")
        out = [r.declaring(priority=alone[r.request_id]) for r in workload]
    else:
        out = [r.declaring(priority=None) for r in workload]
    return out, serving.with_scheduling("priority")


def solo_latencies_us(run: Path | None) -> dict[str, int]:
    """request_id -> end-to-end latency alone (µs, rounded) from a replay run (its served requests)."""
    if run is None:
        raise SpecError("--policy oracle needs --oracle-run RUN: a solo replay (--solo) of the same workload")
    table = RunStore.open(run).read_table("requests")
    if table is None:
        raise SpecError(f"--oracle-run {run}: the run has no finished requests")
    frame = table.to_pandas()
    if "rejected" in frame:
        frame = frame[~frame["rejected"].astype(bool)]
    return {str(k): round(float(v) * 1e3) for k, v in zip(frame["request_id"], frame["e2e_ms"], strict=True)}


def live_policy(policy: str, options: dict[str, Any]) -> ArrivalPolicy | None:
    """The installed policy that decides at arrival for `estimate` / `estimate-admit`; None for static ones."""
    if policy not in LIVE:
        return None
    try:
        return load_registered(policy, options)
    except PolicyError as e:
        raise SpecError(str(e)) from None
