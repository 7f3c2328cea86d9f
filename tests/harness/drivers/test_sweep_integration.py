"""A small real sweep on the CPU vLLM engine, checked against docs/results-schema.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from contract.manifest import SAMPLE_COLUMNS
from tests.conftest import run_profile

pytestmark = pytest.mark.slow


def test_manifest_is_complete(small_run: Path) -> None:
    m = json.loads((small_run / "manifest.json").read_text())
    assert m["schema_version"] == 3
    assert m["status"] == "complete"
    assert m["points_total"] == m["points_done"] == 6 and m["points_failed"] == 0
    assert len(m["engine_starts"]) == 2 and all(s["seconds"] > 0 for s in m["engine_starts"])
    assert m["environment"]["vllm_build"] == "cpu" and m["environment"]["vllm"]
    assert m["telemetry"]["source"] == "host"
    assert m["engine_mode"] == "multiprocess"
    assert m["ended_at"] and m["command"] and m["spec"]["max_new_tokens"] == 9
    assert 0.5 < m["summary"]["decode_harness_over_engine_ratio"] < 2.0


def test_samples_follow_the_contract(small_run: Path) -> None:
    s = pd.read_parquet(small_run / "samples")
    assert set(SAMPLE_COLUMNS) <= set(s.columns)  # what the estimator's readers rely on (contract/manifest.py)
    # 6 points x 7 requests x 9 steps
    assert len(s) == 6 * 7 * 9
    assert set(s.phase) == {"prefill", "decode"}
    assert (s.phase == "prefill").sum() == 6 * 7
    for _, req in s.groupby(["point_id", "rep"]):
        req = req.sort_values("step_index")
        n = int(req.text_tokens.iloc[0])
        assert list(req.step_index) == list(range(9))
        assert list(req.position) == list(range(n, n + 9))  # decode positions consecutive from text_tokens
        assert req.phase.iloc[0] == "prefill" and set(req.phase.iloc[1:]) == {"decode"}
        assert (req.t_end_s.diff().dropna() > 0).all()
    assert (s.latency_ms > 0).all()
    assert (s.prefill_iterations == 1).all() and (s.prefill_chunk == 0).all()  # each prefill one iteration
    # each request's place in its engine start's interleaved order (one engine start per config here)
    assert (s.groupby(["point_id", "rep"]).seq.nunique() == 1).all()
    for _, g in s[s.phase == "prefill"].groupby("engine_config_id"):
        assert sorted(g.seq) == list(range(len(g)))
        first = g.sort_values("seq").head(len(g) // 2)
        assert first.text_tokens.nunique() == 3 and first.prompt_kind.nunique() == 2  # interleaved, not by point
    assert s.engine_elapsed_ms.notna().mean() > 0.95
    assert {"tel_cpu_util_pct", "tel_rss_mb", "throttled"} <= set(s.columns)
    pre = s[s.phase == "prefill"].groupby("text_tokens").latency_ms.median()
    assert pre[1024] > 3 * pre[64]
    assert set(s.prompt_kind) == {"distinct", "same"}
    same = s[(s.prompt_kind == "same") & (s.phase == "prefill")]
    assert (same.groupby("point_id").prompt_id.nunique() == 1).all()
    distinct = s[(s.prompt_kind == "distinct") & (s.phase == "prefill")]
    assert (distinct.groupby("point_id").prompt_id.nunique() == 4).all()


def test_prompts_and_telemetry_written(small_run: Path) -> None:
    p = pd.read_parquet(small_run / "prompts")
    s = pd.read_parquet(small_run / "samples")
    assert set(s.prompt_id) == set(p.prompt_id)
    assert (p.token_ids.map(len) == p.text_tokens).all()
    assert p.text.str.len().min() > 0
    t = pd.read_parquet(small_run / "telemetry")
    assert len(t) > 10 and (t.source == "host").all()


def test_resume_completes_a_killed_run_without_duplicates(small_run: Path, tmp_path: Path) -> None:
    run = tmp_path / small_run.name
    shutil.copytree(small_run, run)
    victim = sorted((run / "samples").glob("*.parquet"))[-1]
    victim.unlink()
    (run / "samples" / f"{victim.stem}.parquet.tmp").write_bytes(b"PAR1 cut by a kill")
    m = json.loads((run / "manifest.json").read_text())
    m["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(m))
    proc = run_profile("sweep", "--resume", str(run), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "discarded unfinished write" in proc.stderr
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "complete" and m["points_done"] == 6
    assert len(m["engine_starts"]) == 3  # one more, only for the missing point's engine config
    s = pd.read_parquet(run / "samples")
    assert len(s) == 6 * 7 * 9
    assert not s.duplicated(["point_id", "rep", "step_index"]).any()
    assert not list(run.rglob("*.tmp"))
