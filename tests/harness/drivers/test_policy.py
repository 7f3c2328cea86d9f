"""Scheduling policies: each request's priority at arrival, the engine's scheduling policy, and the same arrivals
for every policy (harness/drivers/replay.py `apply_policy`, scripts/bench_scheduler.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.drivers.replay import apply_policy
from harness.rundata.spec import SpecError
from harness.rundata.workload import WorkloadRequest, parse_workload
from tests.conftest import load_script

REQS = [WorkloadRequest(0, 0.0, 500, 8), WorkloadRequest(1, 0.1, 40, 8, priority=7), WorkloadRequest(2, 0.2, 90, 3)]


def test_fcfs_sets_no_priorities_and_keeps_the_default_policy() -> None:
    data: dict = {}
    out = apply_policy("fcfs", data, REQS)
    assert [r.priority for r in out] == [None, None, None]
    assert "engine" not in data


def test_prompt_policy_puts_short_prompts_first() -> None:
    data: dict = {"engine": {"enforce_eager": True}}
    out = apply_policy("prompt", data, REQS)
    assert [r.priority for r in out] == [500, 40, 90]
    assert data["engine"] == {"enforce_eager": True, "scheduling_policy": "priority"}


def test_file_policy_needs_every_priority() -> None:
    with pytest.raises(SpecError, match="line 1 has no priority"):
        apply_policy("file", {}, REQS)
    given = [WorkloadRequest(r.index, r.arrival_s, r.text_tokens, r.new_tokens, None, 5 - r.index) for r in REQS]
    data: dict = {}
    assert [r.priority for r in apply_policy("file", data, given)] == [5, 4, 3]
    assert data["engine"]["scheduling_policy"] == "priority"
    with pytest.raises(SpecError, match="--policy must be one of"):
        apply_policy("lifo", {}, REQS)


def test_every_policy_keeps_the_arrivals_and_lengths() -> None:
    key = [(r.request_id, r.arrival_s, r.text_tokens, r.new_tokens) for r in REQS]
    for policy in ("fcfs", "prompt"):
        assert [(r.request_id, r.arrival_s, r.text_tokens, r.new_tokens) for r in apply_policy(policy, {}, REQS)] == key


def test_workload_priority_is_an_integer() -> None:
    assert parse_workload('{"arrival_s": 0, "text_tokens": 3, "new_tokens": 2, "priority": -4}\n')[0].priority == -4
    with pytest.raises(SpecError, match="line 1: priority must be an integer"):
        parse_workload('{"arrival_s": 0, "text_tokens": 3, "new_tokens": 2, "priority": 1.5}\n')


def test_bench_traces_are_shared_by_policies_and_estimate_orders_by_predicted_latency(tmp_path: Path) -> None:
    bench = load_script("bench_scheduler")
    a, b = bench.bimodal(5.0, 50, 1), bench.bimodal(5.0, 50, 1)
    assert a == b and bench.bimodal(5.0, 50, 2) != a
    assert {r.text_tokens >= 768 for r in a} == {True, False}
    from estimator.model.iteration import ITERATION_FORMAT, TERMS, IterationConfigFit, IterationEstimator, IterationMeta
    from estimator.sim.scheduler import EngineConfig

    meta = IterationMeta(
        format_version=ITERATION_FORMAT,
        created_at="x",
        runs=["r"],
        config_columns=["tier"],
        terms=list(TERMS),
        configs=[IterationConfigFit(config={"tier": 0}, rows=1, coef_ms=[5.0, 0.1, 0.0, 0.5, 0.001, 0.0])],
        rows=1,
        composition_range={},
    )
    engine = EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=2048, block_size=128, num_blocks=256, max_model_len=4096
    )
    prio, cost_us = bench.estimate_priorities(a, IterationEstimator(meta), {"tier": 0}, engine)
    assert cost_us > 0
    longest = max(range(len(a)), key=lambda i: a[i].text_tokens * 0.1 + a[i].new_tokens * 5.5)
    assert prio[longest] == max(prio)  # the longest predicted request goes last
