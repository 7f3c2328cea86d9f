"""Scheduling policies: each request's priority at arrival, the engine's scheduling policy, and the same arrivals
for every policy (harness/drivers/replay.py `apply_policy`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.request import Request
from harness.drivers.policy import apply_policy
from harness.drivers.replay import replay_spec
from harness.rundata.spec import ServingSpec, SpecError, build_serving
from harness.rundata.workload import parse_workload

REQS = [Request.numbered(0, 0.0, 500, 8), Request.numbered(1, 0.1, 40, 8, priority=7), Request.numbered(2, 0.2, 90, 3)]


def test_fcfs_sets_no_priorities_and_keeps_the_default_policy() -> None:
    out, serving = apply_policy("fcfs", ServingSpec(), REQS)
    assert [r.priority for r in out] == [None, None, None]
    assert serving.engine == {}


def test_prompt_policy_puts_short_prompts_first() -> None:
    out, serving = apply_policy("prompt", ServingSpec(engine={"enforce_eager": True}), REQS)
    assert [r.priority for r in out] == [500, 40, 90]
    assert serving.engine == {"enforce_eager": True, "scheduling_policy": "priority"}


def test_file_policy_needs_every_priority() -> None:
    with pytest.raises(SpecError, match="line 1 has no priority"):
        apply_policy("file", ServingSpec(), REQS)
    given = [r.declaring(priority=5 - r.index) for r in REQS]
    out, serving = apply_policy("file", ServingSpec(), given)
    assert [r.priority for r in out] == [5, 4, 3]
    assert serving.engine["scheduling_policy"] == "priority"
    with pytest.raises(SpecError, match="--policy must be one of"):
        apply_policy("lifo", ServingSpec(), REQS)


def test_every_policy_keeps_the_arrivals_and_lengths() -> None:
    def key(reqs: list[Request]) -> list[tuple[str, float, int, int]]:
        return [(r.request_id, r.arrival_s, r.text_tokens, r.output_tokens) for r in reqs]

    for policy in ("fcfs", "prompt"):
        assert key(apply_policy(policy, ServingSpec(), REQS)[0]) == key(REQS)


def test_a_serving_spec_is_one_typed_engine_config() -> None:
    spec = replay_spec(ServingSpec(tier=1, top_k=5, max_num_seqs=4), REQS)
    assert spec.axes == {"tier": [1], "top_k": [5], "blocks": [128], "text_tokens": [500]}
    assert (spec.max_num_seqs, spec.max_new_tokens) == (4, 2)
    local = replay_spec(ServingSpec(model="cpu-small", tier=2), REQS)
    assert local.axes["tier"] == [0] and local.ladder == ["cpu-small"]
    with pytest.raises(SpecError, match="invalid blocks"):
        build_serving(blocks=0)
    with pytest.raises(SpecError, match="invalid colour"):
        build_serving(colour="red")


def test_workload_priority_is_an_integer() -> None:
    assert parse_workload('{"arrival_s": 0, "text_tokens": 3, "new_tokens": 2, "priority": -4}\n')[0].priority == -4
    with pytest.raises(SpecError, match="line 1: priority must be an integer"):
        parse_workload('{"arrival_s": 0, "text_tokens": 3, "new_tokens": 2, "priority": 1.5}\n')


# --- on the harness's replay loop, with the fake engine of test_workload.py --------------------------------


def _fake(monkeypatch: pytest.MonkeyPatch, seen: list[tuple[str, int]]) -> None:
    from typing import Any

    from tests.harness.drivers import test_workload as tw

    class LLM(tw._FakeLLM):
        def add_request(self, rid: str, prompt: Any, params: Any, priority: int = 0) -> None:
            seen.append((rid, priority))
            super().add_request(rid, prompt, params)

    class Engine(tw._FakeEngine):
        def __init__(self, settings: Any) -> None:
            super().__init__(settings)
            self.llm_engine = LLM(self._details, self.budget, None)

        def effective_config(self) -> dict[str, Any]:  # one sequence at a time, as the replica will assume
            return {"max_num_seqs": 1, "block_size": 16, "num_gpu_blocks": 1000, "max_num_batched_tokens": 2048,
                    "max_model_len": 4096}

    monkeypatch.setattr("harness.drivers.replay.VllmEngine", Engine)


def _workload(tmp_path: Path) -> Path:
    import json

    w = tmp_path / "w.jsonl"
    lines = (json.dumps({"arrival_s": 0.0, "text_tokens": 40, "new_tokens": n}) + "\n" for n in (30, 30, 5))
    w.write_text("".join(lines))
    return w


def _run(tmp_path: Path, *args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from harness.cli.app import app

    result = CliRunner().invoke(app, ["replay", "--warmup", "0", "--out", str(tmp_path / "results"), *args])
    return result.exit_code, result.stdout + result.stderr


def _model(tmp_path: Path) -> Path:
    from estimator.model.iteration import ITERATION_FORMAT, TERMS, IterationConfigFit, IterationEstimator, IterationMeta

    meta = IterationMeta(
        format_version=ITERATION_FORMAT, created_at="x", runs=["r"], config_columns=["tier", "top_k", "blocks"],
        terms=list(TERMS), rows=1, composition_range={},
        configs=[IterationConfigFit(config={"tier": 0, "top_k": 0, "blocks": 32}, rows=1,
                                    coef_ms=[10.0, 0, 0, 0, 0, 0])],
    )
    IterationEstimator(meta).save(tmp_path / "model")
    return tmp_path / "model"


def test_estimate_admit_rejects_at_arrival_and_records_the_rejection(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Three requests at once, one sequence at a time, 10 ms per iteration: the first is admitted (TTFT 10 ms
    alone); the second would wait 300 ms behind it and is rejected; the third (5 tokens) sorts ahead of the first
    under `estimate`'s priority, so its predicted TTFT is 10 ms and it is admitted."""
    import pandas as pd

    seen: list[tuple[str, int]] = []
    _fake(monkeypatch, seen)
    code, out = _run(tmp_path, "--workload", str(_workload(tmp_path)), "--blocks", "32", "--name", "adm",
                     "--policy", "estimate-admit", "--policy-model", str(_model(tmp_path)), "--slo", "0:100:50")
    assert code == 0, out
    req = pd.read_parquet(tmp_path / "results" / "adm" / "requests").set_index("request_id")
    assert list(req.rejected) == [False, True, False]
    assert req.loc["req-00001", "rejected_reason"] == "predicted TTFT 310 ms > SLO 100 ms"
    assert pd.isna(req.loc["req-00001", "ttft_ms"]) and req.loc["req-00000", "ttft_ms"] > 0
    assert (req.decision_us > 0).all()
    assert seen == [("req-00000", 300_000), ("req-00002", 50_000)]  # the rejected one never reached the engine
    import json

    manifest = json.loads((tmp_path / "results" / "adm" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["requests_done"] == 3
    assert manifest["replay"]["source"]["policy"] == "estimate-admit"


def test_solo_then_oracle_priorities_are_the_latencies_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    seen: list[tuple[str, int]] = []
    _fake(monkeypatch, seen)
    w = _workload(tmp_path)
    code, out = _run(tmp_path, "--workload", str(w), "--blocks", "32", "--name", "solo", "--solo")
    assert code == 0, out
    it = pd.read_parquet(tmp_path / "results" / "solo" / "iterations")
    assert it.batch_size.max() == 1  # never two requests in the engine
    alone = pd.read_parquet(tmp_path / "results" / "solo" / "requests").set_index("request_id")
    seen.clear()
    code, out = _run(tmp_path, "--workload", str(w), "--blocks", "32", "--name", "orc", "--policy", "oracle",
                     "--oracle-run", str(tmp_path / "results" / "solo"))
    assert code == 0, out
    assert seen == [(rid, round(alone.loc[rid, "e2e_ms"] * 1e3)) for rid in ("req-00000", "req-00001", "req-00002")]
    code, out = _run(tmp_path, "--workload", str(w), "--blocks", "32", "--policy", "oracle")
    assert code == 2 and "needs --oracle-run" in out
    code, out = _run(tmp_path, "--workload", str(w), "--blocks", "32", "--policy", "estimate")
    assert code == 2 and "needs --policy-model" in out
    code, out = _run(tmp_path, "--workload", str(w), "--blocks", "32", "--policy", "estimate", "--policy-model",
                     str(_model(tmp_path)), "--policy-lengths", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "output-length training trace: cannot read workload file" in out


def test_the_harness_records_its_gap_before_each_iteration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    _fake(monkeypatch, [])
    code, out = _run(tmp_path, "--workload", str(_workload(tmp_path)), "--blocks", "32", "--name", "gaps",
                     "--flush-every", "1")
    assert code == 0, out
    it = pd.read_parquet(tmp_path / "results" / "gaps" / "iterations").sort_values("iteration")
    assert pd.isna(it.gap_before_ms.iloc[0]) and (it.gap_before_ms.iloc[1:] >= 0).all()
    # the 5-token request finishes in iteration 4 and the files are written before iteration 5; the other two
    # finish together in the last iteration (their write comes after it)
    assert it[it.checkpoint_before].iteration.tolist() == [5]
    gaps = it.set_index("iteration").gap_before_ms
    assert (gaps[it[it.checkpoint_before].iteration] > 0).all()
