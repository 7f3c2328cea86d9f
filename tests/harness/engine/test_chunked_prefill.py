"""A prefill must be one engine iteration: one over several (chunked prefill) fails its point unless the spec
allows it, and then each chunk is its own row."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import run_profile

pytestmark = pytest.mark.slow

# a 200-token prompt under a 64-token budget: chunks of 64, 64, 64 and 8 tokens
SPEC = (
    "reps = 1\nsame_prompt_repeats = 0\nmax_new_tokens = 3\nwarmup_requests = 0\nmax_num_seqs = 8\n{extra}"
    "[axes]\ntext_tokens = [200]\ntier = [0]\ntop_k = [0]\nblocks = [32]\n"
    "[engine]\nmax_num_batched_tokens = 64\n"
)


def _sweep(tmp_path: Path, extra: str) -> tuple[int, str, Path]:
    spec = tmp_path / "chunked.toml"
    spec.write_text(SPEC.format(extra=extra))
    proc = run_profile("sweep", "--spec", str(spec), "--quiet", "--out", str(tmp_path / "r"), "--name", "run")
    return proc.returncode, proc.stderr, tmp_path / "r" / "run"


def test_a_chunked_prefill_fails_its_point(tmp_path: Path) -> None:
    code, stderr, run = _sweep(tmp_path, "")
    assert code == 1, stderr[-3000:]
    (failure,) = [json.loads(line) for line in (run / "failures.jsonl").read_text().splitlines()]
    assert failure["error_type"] == "MeasurementError"
    assert "the prefill of 200 tokens took 4 engine iterations" in failure["error"]
    assert "allow_chunked_prefill" in failure["error"]


def test_an_allowed_chunked_prefill_is_recorded_chunk_by_chunk(tmp_path: Path) -> None:
    code, stderr, run = _sweep(tmp_path, "allow_chunked_prefill = true\n")
    assert code == 0, stderr[-3000:]
    s = pd.read_parquet(run / "samples").sort_values(["step_index", "prefill_chunk"])
    pre = s[s.phase == "prefill"]
    assert list(pre.prefill_chunk) == [0, 1, 2, 3]
    assert list(pre.position) == [64, 128, 192, 200]  # KV length after each chunk
    assert (s.prefill_iterations == 4).all() and (pre.latency_ms > 0).all()
    assert pre.engine_elapsed_ms.notna().all()
    dec = s[s.phase == "decode"]
    assert list(dec.position) == [201, 202] and (dec.prefill_chunk == 0).all()
