"""Several requests in flight on the real CPU engine: one small replay and one small sweep with a batch axis."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from contract.manifest import ITERATION_COLUMNS, REQUEST_COLUMNS
from tests.conftest import run_profile

pytestmark = pytest.mark.slow

# overlapping lifetimes: two prompts together, two more joining while the first ones decode
WORKLOAD = [
    {"arrival_s": 0.0, "text_tokens": 64, "new_tokens": 80},
    {"arrival_s": 0.0, "text_tokens": 128, "new_tokens": 40},
    {"arrival_s": 0.02, "text_tokens": 96, "new_tokens": 20},
    {"arrival_s": 0.04, "text_tokens": 32, "new_tokens": 10},
]


@pytest.fixture(scope="module")
def replay_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("replay")
    w = out / "w.jsonl"
    w.write_text("".join(json.dumps(r) + "\n" for r in WORKLOAD))
    proc = run_profile("replay", "--workload", str(w), "--tier", "0", "--blocks", "32", "--warmup", "1",
                       "--out", str(out), "--name", "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "run"


def _members(ids: str) -> list[str]:
    return ids.split(",") if ids else []


def test_replay_iterations_match_arrivals_and_lengths(replay_run: Path) -> None:
    m = json.loads((replay_run / "manifest.json").read_text())
    assert m["schema_version"] == 3 and m["kind"] == "replay" and m["status"] == "complete"
    it = pd.read_parquet(replay_run / "iterations").sort_values("iteration")
    req = pd.read_parquet(replay_run / "requests").set_index("request_id")
    assert list(it.iteration) == list(range(len(it)))
    assert (it.batch_size == it.num_prefill_seqs + it.num_decode_seqs).all()
    assert (it.batch_size == it.request_ids.map(lambda s: len(_members(s)))).all()
    assert it.batch_size.max() >= 3  # lifetimes overlapped: prefill and decodes shared iterations
    assert ((it.num_prefill_seqs > 0) & (it.num_decode_seqs > 0)).any()
    # the engine's own counts agree with what the harness saw (nothing flagged on this small workload)
    assert it.engine_num_ctx_tokens.notna().all() and not it.composition_mismatch.any()
    for i, w in enumerate(WORKLOAD):
        rid = f"req-{i:05d}"
        rows = it[it.request_ids.map(lambda s, r=rid: r in _members(s))]
        assert len(rows) == w["new_tokens"]  # one prefill + one iteration per further token (no chunking here)
        assert rows.prefill_tokens.iloc[0] >= w["text_tokens"]
        assert req.loc[rid, "text_tokens"] == w["text_tokens"] and req.loc[rid, "new_tokens"] == w["new_tokens"]
    assert it.prefill_tokens.sum() == sum(w["text_tokens"] for w in WORKLOAD)
    assert it.num_decode_seqs.sum() == sum(w["new_tokens"] - 1 for w in WORKLOAD)


def test_replay_requests_agree_with_iterations(replay_run: Path) -> None:
    it = pd.read_parquet(replay_run / "iterations").set_index("iteration")
    req = pd.read_parquet(replay_run / "requests")
    assert set(ITERATION_COLUMNS) - {"iteration"} <= set(it.columns) and set(REQUEST_COLUMNS) <= set(req.columns)
    assert len(req) == len(WORKLOAD) and req.request_id.is_unique
    for _, r in req.iterrows():
        listed = [i for i, ids in it.request_ids.items() if r.request_id in _members(ids)]
        assert (r.first_iteration, r.last_iteration) == (listed[0], listed[-1])
        assert len(r.token_times_ms) == r.new_tokens
        ends = [(it.t_end_s[i] - r.arrival_t_s) * 1e3 for i in listed]
        assert r.token_times_ms == pytest.approx(ends)
        assert r.ttft_ms == pytest.approx(ends[0]) and r.e2e_ms == pytest.approx(ends[-1])
        assert r.queue_ms == pytest.approx((it.t_start_s[listed[0]] - r.arrival_t_s) * 1e3)
        assert 0 <= r.queue_ms < r.ttft_ms <= r.e2e_ms
        # its decode context grows by one per iteration, from text_tokens + 1
        first_prefill = it.loc[listed[0]]
        assert first_prefill.num_prefill_seqs >= 1
    arrivals = [w["arrival_s"] for w in WORKLOAD]
    assert list(req.sort_values("request_id").arrival_s) == arrivals


def test_sweep_with_a_batch_axis(tmp_path: Path) -> None:
    spec = tmp_path / "batch.toml"
    spec.write_text(
        "reps = 1\nsame_prompt_repeats = 0\nmax_new_tokens = 6\nwarmup_requests = 1\n"
        "[axes]\ntier = [0]\nblocks = [32]\ntop_k = [0]\ntext_tokens = [32]\nbatch = [1, 3]\n"
        "batch_join_tokens = [0, 16]\n"
    )
    proc = run_profile("sweep", "--spec", str(spec), "--out", str(tmp_path), "--name", "run", "--quiet")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "manifest.json").read_text())["points_done"] == 4
    it = pd.read_parquet(run / "iterations")
    req = pd.read_parquet(run / "requests")
    assert set(it.kind) == {"batch"} and it.segment_id.nunique() == 4 and not list((run / "samples").iterdir())
    for (b, join), g in it.groupby(["batch", "batch_join_tokens"]):
        r = req[(req.batch == b) & (req.batch_join_tokens == join)]
        assert len(r) == b + (1 if join else 0)
        assert g.num_decode_seqs.max() >= b
        assert g.prefill_tokens.sum() == 32 * b + join
        if join:  # the joiner's prefill shared an iteration with the batch's decodes
            assert ((g.num_prefill_seqs == 1) & (g.num_decode_seqs == b) & (g.prefill_tokens == join)).any()
    assert not it.composition_mismatch.any()
