from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from harness.rundata.store import RunStore, StoreError, atomic_path


def _tables(point: str) -> dict[str, pa.Table]:
    return {"samples": pa.table({"point_id": [point, point], "latency_ms": [1.0, 2.0]}),
            "prompts": pa.table({"prompt_id": ["p"], "point_id": [point]})}


def test_atomic_path_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "f.parquet"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert not target.exists()
    assert not list(tmp_path.iterdir())


def test_points_written_are_done_and_readable(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, {"status": "running"}, run_id="r")
    store.write_point("a", _tables("a"))
    store.write_point("b", _tables("b"))
    assert store.done_points() == {"a", "b"}
    assert store.read_table("samples").num_rows == 4
    assert not list(store.run_dir.rglob("*.tmp"))


def test_resume_bookkeeping_discards_partial_writes(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, {"status": "running"}, run_id="r")
    store.write_point("a", _tables("a"))
    # what a kill can leave: a half-written samples file, and prompts of a point whose samples never landed
    (store.run_dir / "samples" / "b.parquet.tmp").write_bytes(b"PAR1 half")
    (store.run_dir / "prompts" / "b.parquet").write_bytes(b"x")
    reopened = RunStore.open(store.run_dir)
    removed = {p.name for p in reopened.discard_partial()}
    assert removed == {"b.parquet.tmp", "b.parquet"}
    assert reopened.done_points() == {"a"}
    assert reopened.read_table("samples").num_rows == 2


def test_open_refuses_non_runs_and_other_schemas(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a run folder"):
        RunStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(StoreError, match="schema_version 99"):
        RunStore.open(tmp_path)


def test_batch_points_are_done_by_their_iterations_file_and_version_1_runs_resume(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, {"status": "running"}, run_id="r")
    assert store.read_manifest()["schema_version"] == 3
    store.write_point("a", {"requests": pa.table({"request_id": ["x"]}), "iterations": pa.table({"iteration": [0]})})
    (store.run_dir / "requests" / "b.parquet").write_bytes(b"a kill came before b's iterations landed")
    assert store.done_points() == {"a"}
    assert {p.name for p in store.discard_partial()} == {"b.parquet"}
    store.update_manifest(schema_version=1)  # a version-1 sweep: same tables and columns, resumed as is
    assert RunStore.open(store.run_dir).done_points() == {"a"}


def test_failures_survive_a_cut_line(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, {}, run_id="r")
    store.record_failure({"point_id": "a", "error": "boom"})
    with (store.run_dir / "failures.jsonl").open("a") as f:
        f.write('{"point_id": "b", "err')
    assert [f["point_id"] for f in store.failures()] == ["a"]


def test_unwritable_output_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="not writable"):
        RunStore.create(blocker / "results", {})


def test_client_lag_flags_the_short_step_and_the_one_that_absorbed_the_wait() -> None:
    from harness.engine.vllm_engine import StepRecord, mark_client_lag

    def step(i: int, caller_ms: float, engine_ms: float) -> StepRecord:
        return StepRecord(step_index=i, t_start_s=i, t_end_s=i + 1, latency_ms=caller_ms, step_calls=1,
                          engine_elapsed_ms=engine_ms)

    steps = [step(0, 10.0, 9.5), step(1, 8.0, 4.0), step(2, 0.07, 4.0), step(3, 4.1, 4.0)]
    mark_client_lag(steps, "multiprocess")
    assert [s.client_lagged for s in steps] == [False, True, True, False]


def test_client_lag_is_never_marked_in_process() -> None:
    """In-process, the iteration runs inside the caller's step() (the caller cannot fall behind it), and the
    engine's own time covers only the sampling tail: a step far longer than it is normal, and none is marked."""
    from harness.engine.vllm_engine import client_lag_marks

    assert client_lag_marks([7.6, 2.0, 0.05], [0.35, 0.2, 0.2], "inprocess") == [False, False, False]
    assert client_lag_marks([7.6, 2.0, 0.05], [7.5, 1.9, 1.9], "multiprocess") == [False, True, True]
