"""The scheduler replica on hand-made cases whose vLLM v1 behaviour is known (estimator/sim/scheduler.py)."""

from __future__ import annotations

import pytest

from contract.request import Request
from estimator.sim.scheduler import EngineConfig, SimulationError, simulate


def engine(**kw: object) -> EngineConfig:
    base = {
        "max_num_seqs": 8,
        "max_num_batched_tokens": 2048,
        "block_size": 16,
        "num_blocks": 1000,
        "max_model_len": 4096,
    }
    return EngineConfig(**{**base, **kw})  # type: ignore[arg-type]


def flat(ms: float = 10.0):  # noqa: ANN201
    return lambda *_: ms


def test_one_request_alone_is_one_prefill_then_decodes() -> None:
    run = simulate([Request.make("a", 0.5, 100, 4)], engine(), flat(10.0), keep_steps=True)
    assert run.iterations == 4
    assert run.steps[0].prefill == (("a", 100, 0),) and run.steps[0].decode == ()
    assert [s.decode for s in run.steps[1:]] == [(("a", 101),), (("a", 102),), (("a", 103),)]
    times = run.requests[0].token_times_s
    assert times == pytest.approx([0.51, 0.52, 0.53, 0.54])
    assert run.requests[0].first_scheduled_s == 0.5


def test_token_budget_chunks_the_second_prompt_and_running_goes_first() -> None:
    arrivals = [Request.make("a", 0.0, 1500, 3), Request.make("b", 0.0, 1000, 2)]
    run = simulate(arrivals, engine(), flat(), keep_steps=True)
    assert run.steps[0].prefill == (("a", 1500, 0), ("b", 548, 0))
    # next: a decodes (running first), b's remaining 452 tokens prefill; b samples its first token at its end
    assert run.steps[1].decode == (("a", 1501),) and run.steps[1].prefill == (("b", 452, 548),)
    assert len(run.requests[1].token_times_s) == 2
    assert run.requests[1].token_times_s[0] == run.steps[1].t_end_s


def test_without_chunked_prefill_a_prompt_longer_than_the_budget_waits() -> None:
    arrivals = [Request.make("a", 0.0, 1500, 2), Request.make("b", 0.0, 1000, 2)]
    run = simulate(arrivals, engine(enable_chunked_prefill=False), flat(), keep_steps=True)
    assert run.steps[0].prefill == (("a", 1500, 0),)
    assert run.steps[1].prefill == (("b", 1000, 0),) and run.steps[1].decode == (("a", 1501),)


def test_max_num_seqs_queues_the_rest() -> None:
    arrivals = [Request.make("a", 0.0, 10, 5), Request.make("b", 0.0, 10, 5)]
    run = simulate(arrivals, engine(max_num_seqs=1), flat(10.0))
    a, b = run.requests
    assert b.first_scheduled_s == pytest.approx(a.token_times_s[-1])
    assert run.iterations == 10


def test_kv_exhaustion_preempts_the_last_running_request_by_recompute() -> None:
    # 3 blocks of 16 tokens: a and b (16-token prompts) admitted; growing past 1 block each needs a third and fourth
    arrivals = [Request.make("a", 0.0, 16, 20), Request.make("b", 0.0, 16, 20)]
    run = simulate(arrivals, engine(num_blocks=3), flat(), keep_steps=True)
    a, b = run.requests
    assert b.preemptions >= 1 and a.preemptions == 0
    assert len(a.token_times_s) == 20 and len(b.token_times_s) == 20
    recompute = [s for s in run.steps if any(r == "b" and cached == 0 and n > 16 for r, n, cached in s.prefill)]
    assert recompute, "a preempted request prefills its prompt and its outputs again"


def test_priority_orders_the_waiting_queue_and_preempts_the_lowest() -> None:
    arrivals = [
        Request.make("x", 0.0, 10, 3, priority=0),
        Request.make("late", 0.0, 10, 3, priority=5),
        Request.make("urgent", 0.0, 10, 3, priority=-1),
    ]
    run = simulate(arrivals, engine(max_num_seqs=1, policy="priority"), flat())
    firsts = {t.request.request_id: t.first_scheduled_s for t in run.requests}
    assert firsts["urgent"] < firsts["x"] < firsts["late"]
    fcfs = simulate(arrivals, engine(max_num_seqs=1), flat())
    assert [t.first_scheduled_s for t in fcfs.requests] == sorted(t.first_scheduled_s for t in fcfs.requests)


def test_preemptive_priority_is_simulated_only_when_asked() -> None:
    # one slot; a long low-priority request is running when an urgent one arrives
    arrivals = [Request.make("slow", 0.0, 10, 50, priority=9), Request.make("urgent", 0.05, 10, 2, priority=0)]
    as_vllm = simulate(arrivals, engine(max_num_seqs=1, policy="priority"), flat(10.0))
    assert as_vllm.requests[1].first_scheduled_s == pytest.approx(as_vllm.requests[0].token_times_s[-1])
    pre = simulate(arrivals, engine(max_num_seqs=1, policy="priority", preemptive_priority=True), flat(10.0))
    slow, urgent = pre.requests
    assert urgent.first_scheduled_s == pytest.approx(0.05) and slow.preemptions == 1
    assert len(slow.token_times_s) == 50 and urgent.token_times_s[-1] < as_vllm.requests[1].token_times_s[-1]


def test_long_prefill_threshold_only_with_company() -> None:
    alone = simulate(
        [Request.make("a", 0.0, 1000, 2)], engine(long_prefill_token_threshold=256), flat(), keep_steps=True
    )
    assert alone.steps[0].prefill == (("a", 1000, 0),)
    two = simulate(
        [Request.make("a", 0.0, 1000, 2), Request.make("b", 0.0, 100, 2)],
        engine(long_prefill_token_threshold=256),
        flat(),
        keep_steps=True,
    )
    assert two.steps[0].prefill == (("a", 256, 0), ("b", 100, 0))


def test_idle_engine_jumps_to_the_next_arrival_and_overhead_adds_per_iteration() -> None:
    run = simulate(
        [Request.make("a", 0.0, 10, 2), Request.make("b", 5.0, 10, 2)], engine(), flat(10.0), iteration_overhead_ms=2.0
    )
    assert run.requests[1].first_scheduled_s == 5.0
    assert run.requests[1].token_times_s == pytest.approx([5.012, 5.024])


def test_sequence_overhead_grows_with_the_batch() -> None:
    arrivals = [Request.make("a", 0.0, 10, 2), Request.make("b", 0.0, 10, 2)]
    run = simulate(arrivals, engine(), flat(10.0), iteration_overhead_ms=1.0, sequence_overhead_ms=0.5)
    assert run.requests[0].token_times_s == pytest.approx([0.012, 0.024])  # 10 + 1 + 2 x 0.5 ms per iteration


def test_measured_windows_set_the_clock() -> None:
    run = simulate(
        [Request.make("a", 0.0, 10, 3)], engine(), flat(10.0), measured_windows=[(0.1, 0.2), (0.3, 0.35)],
        keep_steps=True,
    )
    assert [(s.t_start_s, s.t_end_s) for s in run.steps[:2]] == [(0.1, 0.2), (0.3, 0.35)]
    assert run.requests[0].token_times_s[2] == pytest.approx(0.36)  # past the windows: the model's 10 ms


@pytest.mark.parametrize(
    ("arrival", "config", "message"),
    [
        (Request.make("a", 0.0, 4000, 200), {}, "exceed max_model_len"),
        (Request.make("a", 0.0, 100, 100), {"num_blocks": 5}, "more KV blocks"),
        (Request.make("a", 0.0, 0, 1), {}, "must be >= 1"),
    ],
)
def test_bad_requests_fail_with_one_line(arrival: Request, config: dict[str, int], message: str) -> None:
    with pytest.raises(SimulationError, match=message):
        simulate([arrival], engine(**config), flat())


def test_bad_engine_config_fails() -> None:
    with pytest.raises(SimulationError, match="max_num_seqs must be >= 1"):
        simulate([Request.make("a", 0.0, 1, 1)], engine(max_num_seqs=0), flat())
