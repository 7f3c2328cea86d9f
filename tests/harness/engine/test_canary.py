"""The CPU canary (harness/engine/canary.py): one short timing of both shapes, in this process and in its own,
and a failing canary kept as its error."""

from __future__ import annotations

from pathlib import Path

from harness.engine.canary import CANARY_SCHEMA, measure, run_canary


def test_the_canary_times_both_shapes() -> None:
    record = measure(seconds=0.05, context=64, dtype="float32")
    assert record["schema"] == CANARY_SCHEMA and record["model"] == "cpu-tiny" and record["threads"] == 1
    for shape in ("prefill", "decode"):
        assert record[shape]["median_ms"] > 0 and record[shape]["passes"] >= 5 and record[shape]["iqr_ms"] >= 0
    # 64 tokens at once cost more than one token against a 64-token cache
    assert record["prefill"]["median_ms"] > record["decode"]["median_ms"]


def test_a_failed_canary_is_kept_as_its_error(tmp_path: Path) -> None:
    record = run_canary(model=tmp_path / "no-such-model", seconds=0.05)
    assert set(record) == {"error"} and "exit" in record["error"]
