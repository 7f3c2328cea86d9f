"""Arrival policies by predicted latency (estimator/sim/policies.py) and the replica started from an engine's state
(`simulate(in_engine=...)`), on hand-made models whose answers are known."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.policy import Held, load_registered, registered
from contract.request import Declared, Request
from estimator.errors import EstimatorError
from estimator.model.iteration import ITERATION_FORMAT, TERMS, IterationConfigFit, IterationEstimator, IterationMeta
from estimator.sim.policies import EstimateAdmitPolicy, EstimatePolicy, parse_slo
from estimator.sim.scheduler import EngineConfig, InEngine, simulate

ENGINE = {"max_num_seqs": 1, "max_num_batched_tokens": 2048, "block_size": 16, "num_gpu_blocks": 1000,
          "max_model_len": 4096}
CONFIG = {"tier": 0, "top_k": 0, "blocks": 128}


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    """10 ms per iteration, whatever it holds: a request of n outputs alone takes n iterations."""
    meta = IterationMeta(
        format_version=ITERATION_FORMAT, created_at="x", runs=["r"], config_columns=["tier", "top_k", "blocks"],
        terms=list(TERMS), configs=[IterationConfigFit(config=CONFIG, rows=1, coef_ms=[10.0, 0, 0, 0, 0, 0])],
        rows=1, composition_range={},
    )
    IterationEstimator(meta).save(tmp_path / "m")
    return tmp_path / "m"


def flat(*_: object) -> float:
    return 10.0


def test_the_replica_continues_what_the_engine_holds() -> None:
    eng = EngineConfig(max_num_seqs=1, max_num_batched_tokens=2048, block_size=16, num_blocks=100, max_model_len=4096)
    held = [InEngine(Request.make("h", -1.0, 100, 10), computed_tokens=100 + 3, outputs=4, running=True)]
    run = simulate([Request.make("new", 0.0, 50, 2)], eng, flat, in_engine=held)
    # h has 6 tokens left (one iteration each), then the new request: prefill + one decode
    assert run.requests[0].first_scheduled_s == pytest.approx(0.06)
    assert run.requests[0].token_times_s == pytest.approx([0.07, 0.08])
    waiting = [InEngine(Request.make("w", -0.5, 100, 3), running=False)]
    run = simulate([Request.make("new", 0.0, 50, 1)], eng, flat, in_engine=held + waiting)
    assert run.requests[0].token_times_s == pytest.approx([0.06 + 0.03 + 0.01])  # behind h, then w (FCFS)


def test_estimate_orders_by_predicted_latency_alone(model: Path) -> None:
    policy = EstimatePolicy(model)
    with pytest.raises(EstimatorError, match="start"):
        policy.decide(Declared("a", 0.0, 10, 5), [])
    policy.start(ENGINE, {**CONFIG, "model": "cpu-tiny"})
    short, long = policy.decide(Declared("a", 0.0, 10, 5), []), policy.decide(Declared("b", 0.0, 10, 50), [])
    assert (short.priority, long.priority) == (50_000, 500_000)  # µs: 5 and 50 iterations of 10 ms
    assert short.admit and long.admit


def test_estimate_admit_rejects_what_would_miss_its_slo_and_says_why(model: Path) -> None:
    policy = EstimateAdmitPolicy(model, ["0:100:20", "500:400:20"])
    policy.start(ENGINE, CONFIG)
    assert policy.limits_ms(Declared("a", 0.0, 10, 256), 5) == (100.0, 180.0)
    assert policy.limits_ms(Declared("b", 0.0, 600, 256), 5) == (400.0, 480.0)
    assert policy.decide(Declared("a", 0.0, 10, 5), []).admit  # alone: TTFT 10 ms
    # 19 more iterations ahead of it with max_num_seqs 1
    busy = [Held(Declared("h", -0.1, 10, 20), 0, 0.1, 10, 1, True)]
    d = policy.decide(Declared("a", 0.0, 10, 5), busy)
    assert not d.admit and "predicted TTFT 200 ms > SLO 100 ms" in d.reason
    assert d.priority == 50_000  # it keeps the estimate policy's priority
    assert policy.decide(Declared("b", 0.0, 600, 5), busy).admit  # the long class's SLO allows it
    assert policy.predict_ms(Declared("a", 0.0, 10, 5), 0, busy) == pytest.approx((200.0, 240.0))


def test_slo_entries_are_checked() -> None:
    assert parse_slo(["500:400:20", "0:100:5"]) == [(0, 100.0, 5.0), (500, 400.0, 20.0)]
    assert parse_slo(["chat:300:10", "code:100:5"]) == [("chat", 300.0, 10.0), ("code", 100.0, 5.0)]
    for bad in (["100:20"], ["0:x:1"], ["0:100:0"], ["5:100:1"], [], [":1:1"], ["0:1:1:1"]):
        with pytest.raises(EstimatorError):
            parse_slo(bad)


def test_the_estimator_registers_its_policies_for_the_harness(model: Path) -> None:
    assert {"estimate", "estimate-admit"} <= set(registered())
    policy = load_registered("estimate-admit", {"model": str(model), "slo": ["0:100:20"]})
    assert isinstance(policy, EstimateAdmitPolicy)
    from contract.policy import PolicyError

    with pytest.raises(PolicyError, match="no iteration model"):
        load_registered("estimate", {"model": str(model.parent / "missing")})
    with pytest.raises(PolicyError, match="no installed policy 'lifo'"):
        load_registered("lifo", {})


def trace(path: Path) -> Path:
    """A training trace: class `code` always 4 outputs, `chat` 40 (30 each); the cap declared is 256."""
    lines = [f'{{"arrival_s": 0, "text_tokens": {n}, "new_tokens": {out}, "max_tokens": 256, "client_class": "{c}"}}'
             for c, n, out in [("code", 600, 4), ("chat", 60, 40)] for _ in range(30)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_estimate_predicts_the_output_it_is_not_told(model: Path, tmp_path: Path) -> None:
    blind, learned = EstimatePolicy(model), EstimatePolicy(model, lengths=trace(tmp_path / "t.jsonl"))
    for p in (blind, learned):
        p.start(ENGINE, CONFIG)
    code, chat = Declared("a", 0.0, 600, 256, "code"), Declared("b", 0.0, 60, 256, "chat")
    # told only the cap, every request looks the same length; with the trace, the class sets the order
    assert blind.decide(code, []).priority == blind.decide(chat, []).priority == 2_560_000
    assert (learned.decide(code, []).priority, learned.decide(chat, []).priority) == (40_000, 400_000)
    # a held chat request that has produced 10 tokens is expected to run to 40: 30 iterations before a new one
    admit = EstimateAdmitPolicy(model, ["code:100:20", "chat:1000:20"], lengths=tmp_path / "t.jsonl")
    admit.start(ENGINE, CONFIG)
    busy = [Held(chat, 0, 0.1, 60, 10, True)]
    assert admit.predict_ms(code, 0, busy) == pytest.approx((310.0, 340.0))
    d = admit.decide(code, busy)
    assert not d.admit and "SLO 100 ms" in d.reason  # the code class's own SLO, not a prompt-length one
    assert admit.limits_ms(chat, 40) == (1000.0, 1000.0 + 20 * 39)
    with pytest.raises(EstimatorError, match="no SLO for class 'other'"):
        admit.limits_ms(Declared("c", 0.0, 60, 256, "other"), 5)
