"""Workload files and generation, and the replay's bookkeeping (checkpoints, Ctrl-C, --resume) on a fake engine.

The fake stands in for vLLM's LLMEngine (add_request / step / has_unfinished_requests and the iteration details a
stat logger would receive), so the driver's composition logic and the resume path run in a second, not a minute.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from contract.request import Request
from harness.cli.app import app
from harness.drivers.replay import resume_plan
from harness.engine.settings import EngineSettings
from harness.rundata.spec import SpecError
from harness.rundata.workload import LengthDist, generate_workload, parse_workload, write_workload

runner = CliRunner()


def test_generator_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    texts, news = LengthDist.parse("lognormal:200:0.8", "t"), LengthDist.parse("uniform:4:64", "n")
    a = generate_workload(20.0, 200, 7, texts, news, context=1024)
    assert a == generate_workload(20.0, 200, 7, texts, news, context=1024)
    assert a != generate_workload(20.0, 200, 8, texts, news, context=1024)
    arrivals = [r.arrival_s for r in a]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals)
    assert 5 < arrivals[-1] < 15  # 199 gaps of mean 1/20 s
    assert all(r.text_tokens >= 1 and 1 <= r.output_tokens <= 64 and r.text_tokens + r.output_tokens <= 1024 for r in a)
    assert max(r.text_tokens for r in a) > 500  # the lognormal tail is there, clipped to the context
    f1, f2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for f in (f1, f2):
        result = runner.invoke(app, ["workload", "--rate", "5", "--count", "30", "--seed", "3", "--out", str(f)])
        assert result.exit_code == 0, result.output
    assert f1.read_bytes() == f2.read_bytes()
    assert len(parse_workload(f1.read_text())) == 30


def _line(arrival: float, text_tokens: int, new_tokens: int) -> str:
    return json.dumps({"arrival_s": arrival, "text_tokens": text_tokens, "new_tokens": new_tokens})


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"arrival_s": -1, "text_tokens": 8, "new_tokens": 2}'], "line 1: arrival_s -1 is negative"),
        ([_line(1, 8, 2), _line(0.5, 8, 2)], "line 2: arrival_s 0.5 is earlier"),
        (['{"arrival_s": 0, "text_tokens": 0, "new_tokens": 2}'], "line 1: text_tokens must be positive"),
        (['{"arrival_s": 0, "text_tokens": 8, "new_tokens": 2}', "", '{"arrival_s": 0, "text_tokens": 8,'],
         "line 3: not valid JSON"),
        (['{"arrival_s": 0, "text_tokens": 8, "new_tokens": 2, "colour": 1}'], "line 1: unknown key(s) colour"),
        ([_line(0, 8, 2), _line(1, 4000, 200)],
         "line 2: text_tokens 4000 + new_tokens 200 exceeds the model's context (4096 tokens)"),
        (['{"arrival_s": 0, "text_tokens": 8, "new_tokens": 2, "prompt": "too short"}'], "line 1: prompt has"),
    ],
)
def test_bad_workload_is_exit_2_naming_the_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lines: list[str], message: str
) -> None:
    monkeypatch.setattr("harness.drivers.replay.VllmEngine", _refuse)
    f = tmp_path / "w.jsonl"
    f.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results"
    result = runner.invoke(app, ["replay", "--workload", str(f), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([ln for ln in result.output.splitlines() if ln.strip()]) == 1
    assert not out.exists() or not any(out.iterdir())


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("an engine was started")


def test_resume_plan_keeps_relative_arrivals() -> None:
    w = [Request.numbered(i, t, 8, 2) for i, t in enumerate([0.0, 0.5, 1.25, 2.0])]
    todo, base = resume_plan(w, {"req-00000", "req-00002"})
    assert [r.request_id for r in todo] == ["req-00001", "req-00003"]
    assert base == 0.5 and [r.arrival_s - base for r in todo] == [0.0, 1.5]
    assert resume_plan(w, {r.request_id for r in w}) == ([], 0.0)
    with pytest.raises(SpecError, match="no requests"):
        parse_workload("\n\n")


# --- a fake engine -------------------------------------------------------------------------------------------


class _FakeLLM:
    """A first-come-first-served scheduler with a token budget: prefill chunks, then one token per decode."""

    def __init__(self, details: list[Any], budget: int, interrupt_after: int | None) -> None:
        self.details, self.budget, self.interrupt_after = details, budget, interrupt_after
        self.reqs: dict[str, dict[str, Any]] = {}
        self.steps = 0

    def add_request(self, rid: str, prompt: Any, params: Any) -> None:
        n = len(prompt["prompt_token_ids"])
        self.reqs[rid] = {"n": n, "done": 0, "max": params.max_tokens, "tokens": [], "ids": prompt["prompt_token_ids"]}

    def has_unfinished_requests(self) -> bool:
        return any(len(r["tokens"]) < r["max"] for r in self.reqs.values())

    def abort_request(self, ids: list[str]) -> None:
        for i in ids:
            self.reqs.pop(i, None)

    def step(self) -> list[Any]:
        self.steps += 1
        if self.interrupt_after is not None and self.steps == self.interrupt_after:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does: the replay stops after this step
        budget, outs = self.budget, []
        ctx = [0, 0, 0, 0]
        for rid, r in list(self.reqs.items()):
            if len(r["tokens"]) >= r["max"]:
                continue
            if r["done"] < r["n"]:  # prefill (a chunk when the budget runs out)
                take = min(budget, r["n"] - r["done"])
                if take == 0:
                    continue
                budget -= take
                r["done"] += take
                ctx[0] += 1
                ctx[1] += take
                if r["done"] < r["n"]:
                    continue
            elif budget:
                budget -= 1
                ctx[2] += 1
                ctx[3] += 1
            else:
                continue
            r["tokens"].append(1)
            finished = len(r["tokens"]) == r["max"]
            outs.append(SimpleNamespace(request_id=rid, outputs=[SimpleNamespace(token_ids=list(r["tokens"]))],
                                        finished=finished, prompt_token_ids=r["ids"], num_cached_tokens=0))
        if any(ctx):
            self.details.append(SimpleNamespace(elapsed_ms=1.0, num_ctx_requests=ctx[0], num_ctx_tokens=ctx[1],
                                                num_generation_requests=ctx[2], num_generation_tokens=ctx[3]))
        return outs


class _FakeEngine:
    """Stands in for harness.engine.vllm_engine.VllmEngine (start, effective config, LLMEngine, iteration details)."""

    budget = 1 << 20
    interrupt_after: int | None = None
    dtype = "float32"

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.died = None
        self._details: list[Any] = []
        self.llm_engine = _FakeLLM(self._details, self.budget, self.interrupt_after)

    def start(self) -> float:
        return 0.01

    def effective_config(self) -> dict[str, Any]:
        return {"max_num_seqs": 128, "block_size": self.settings.block_size}

    def effective_value(self, kind: str, key: str) -> tuple[bool, Any]:
        return (True, self.settings.block_size) if (kind, key) == ("engine", "block_size") else (False, None)

    def collect_iteration_details(self) -> list[Any]:
        return self._details

    def dtype_mismatch(self) -> str | None:
        return None

    def close(self) -> None:
        pass


def _replay(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["replay", "--warmup", "0", "--out", str(tmp_path / "results"), *args])
    return result.exit_code, result.stdout + result.stderr


WORKLOAD = [  # overlapping lifetimes; the second and third arrive together and exceed the fake's budget together
    {"arrival_s": 0.0, "text_tokens": 40, "new_tokens": 30},
    {"arrival_s": 0.01, "text_tokens": 100, "new_tokens": 10},
    {"arrival_s": 0.01, "text_tokens": 90, "new_tokens": 5},
    {"arrival_s": 0.3, "text_tokens": 20, "new_tokens": 4},
]


def test_fake_replay_chunks_ctrl_c_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("harness.drivers.replay.VllmEngine", _FakeEngine)
    monkeypatch.setattr(_FakeEngine, "budget", 128)
    monkeypatch.setattr(_FakeEngine, "interrupt_after", 41)  # Ctrl-C in the last request's first step
    w = tmp_path / "w.jsonl"
    w.write_text("".join(json.dumps(r) + "\n" for r in WORKLOAD))
    code, output = _replay(tmp_path, "--workload", str(w), "--blocks", "32", "--name", "run")
    run = tmp_path / "results" / "run"
    assert code == 130, output
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "interrupted" and m["requests_done"] == 3 and m["schema_version"] == 3
    it = pd.read_parquet(run / "iterations")
    # the budget (128) splits the two simultaneous prompts: 100 whole, then 28 + 62 of the 90 as two chunks
    chunked = it[it.prefill_chunk_inferred]
    assert len(chunked) == 1
    assert chunked.num_prefill_seqs.iloc[0] == 2 and chunked.prefill_tokens.iloc[0] == 128
    assert chunked.request_ids.iloc[0] == "req-00001,req-00002"
    follow = it[it.iteration == chunked.iteration.iloc[0] + 1].iloc[0]
    assert (follow.num_prefill_seqs, follow.prefill_tokens, follow.prefill_ctx_sum) == (1, 62, 28)
    assert (follow.num_decode_seqs, follow.decode_ctx_sum) == (1, 101)  # req-00001 after its first token
    assert not it.composition_mismatch.any()

    monkeypatch.setattr(_FakeEngine, "interrupt_after", None)
    code, output = _replay(tmp_path, "--resume", str(run))
    assert code == 0, output
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "complete" and m["requests_done"] == 4 and len(m["segments"]) == 2
    assert m["segments"][1]["workload_start_s"] == 0.3
    req = pd.read_parquet(run / "requests")
    assert sorted(req.request_id) == [f"req-{i:05d}" for i in range(4)]  # each once
    assert set(req[req.segment_id == "seg-001"].request_id) == {"req-00003"}
    assert (run / "workload.jsonl").read_text() == w.read_text()
    code, output = _replay(tmp_path, "--resume", str(run))  # nothing left: still complete, nothing added
    assert code == 0 and len(pd.read_parquet(run / "requests")) == 4


def test_write_workload_round_trips(tmp_path: Path) -> None:
    w = [Request.numbered(0, 0.0, 8, 2), Request.numbered(1, 0.25, 16, 3, prompt="some text")]
    write_workload(tmp_path / "w.jsonl", w)
    assert parse_workload((tmp_path / "w.jsonl").read_text()) == w


def test_resume_of_a_sweep_run_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.rundata.store import RunStore

    monkeypatch.setattr("harness.drivers.replay.VllmEngine", _refuse)
    store = RunStore.create(tmp_path, {"status": "interrupted"}, run_id="sweep")
    code, output = _replay(tmp_path, "--resume", str(store.run_dir))
    assert code == 2 and "is not a replay run" in output, output


def test_kill_before_a_checkpoint_then_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a kill -9 leaves: the files of the last checkpoint (here: two of four requests) and a cut write."""
    import pyarrow.parquet as pq

    monkeypatch.setattr("harness.drivers.replay.VllmEngine", _FakeEngine)
    w = tmp_path / "w.jsonl"
    w.write_text("".join(json.dumps(r) + "\n" for r in WORKLOAD))
    assert _replay(tmp_path, "--workload", str(w), "--name", "run")[0] == 0
    run = tmp_path / "results" / "run"
    f = run / "requests" / "seg-000.parquet"
    pq.write_table(pq.read_table(f).slice(0, 2), f)
    (run / "requests" / "seg-000.parquet.tmp").write_bytes(b"PAR1 cut by a kill")
    m = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**m, "status": "running"}))
    code, output = _replay(tmp_path, "--resume", str(run))
    assert code == 0 and "discarded unfinished write requests/seg-000.parquet.tmp" in output, output
    req = pd.read_parquet(run / "requests")
    assert sorted(req.request_id) == [f"req-{i:05d}" for i in range(4)]
    assert sorted(req[req.segment_id == "seg-001"].request_id) == ["req-00002", "req-00003"]
    assert not list(run.rglob("*.tmp"))


def test_engine_counts_that_disagree_are_flagged_not_corrected() -> None:
    from harness.drivers.batch import Iteration, iterations_frame
    from harness.telemetry.sources import telemetry_frame

    def it(i: int, latency: float, counts: tuple[int, int, int, int] | None) -> dict[str, Any]:
        return Iteration(i, i, i + 1, latency, 1, 4.0, counts, [("a", 64, 0)], [("b", 65)]).row()

    rows = [it(0, 4.0, (1, 64, 1, 1)), it(1, 4.0, (1, 64, 2, 2)), it(2, 4.0, None), it(3, 0.1, (1, 64, 1, 1))]
    assert [r["composition_mismatch"] for r in rows] == [False, True, False, False]
    assert rows[1]["num_decode_seqs"] == 1 and rows[1]["engine_num_gen_seqs"] == 2  # both kept side by side
    frame = iterations_frame(rows, telemetry_frame([], "host"))
    assert list(frame.client_lagged) == [False, False, True, True]  # as in samples: the short step and the one before
    assert {"tel_cpu_util_pct", "throttled"} <= set(frame.columns) and frame.engine_num_gen_seqs.isna().sum() == 1
