"""Loading run folders: schema check, *.tmp files ignored, axes, concatenation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from estimator.data.runs import DEFAULT_AXES, load_runs
from estimator.errors import EstimatorError


def test_load_one_run(synthetic_run: Path) -> None:
    rs = load_runs([synthetic_run])
    assert rs.axes == ["tier", "top_k", "blocks"]
    assert rs.config_columns == ["tier", "model", "top_k", "blocks"]
    assert set(rs.samples["phase"]) == {"prefill", "decode"}
    # 2 tiers × 2 top_k × 6 lengths × 7 requests × 8 steps; the *.tmp file is not read
    assert len(rs.samples) == 2 * 2 * 6 * 7 * 8
    assert rs.prompts["prompt_id"].is_unique
    assert len(rs.phase("prefill")) == 2 * 2 * 6 * 7


def test_unknown_schema_version_is_one_line_error(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    run = run_writer(tmp_path, schema_version=4)
    with pytest.raises(EstimatorError, match="schema_version 4") as info:
        load_runs([run])
    assert "\n" not in str(info.value)


def test_missing_manifest(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(EstimatorError, match="no manifest.json"):
        load_runs([tmp_path / "run"])


def test_default_axes_without_spec_axes(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    rs = load_runs([run_writer(tmp_path, axes_in_manifest=False)])
    assert rs.axes == list(DEFAULT_AXES)


def test_two_runs_concatenate(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    a = run_writer(tmp_path, run_id="20250101-000000-aaaaaa", seed=1)
    b = run_writer(tmp_path, run_id="20250101-000000-bbbbbb", seed=2)
    rs = load_runs([a, b])
    assert set(rs.samples["run_id"]) == {a.name, b.name}
    assert len(rs.samples) == 2 * len(load_runs([a]).samples)
    with pytest.raises(EstimatorError, match="given twice"):
        load_runs([a, a])


def test_missing_axis_column(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    run = run_writer(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["spec"]["axes"]["dtype"] = ["bf16"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EstimatorError, match="lack column"):
        load_runs([run])


def test_empty_samples_folder(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    run = run_writer(tmp_path)
    for f in (run / "samples").glob("*.parquet"):
        f.unlink()
    with pytest.raises(EstimatorError, match="no samples"):
        load_runs([run])


def test_prompt_length_axis_is_not_a_config_axis(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    run = run_writer(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["spec"]["axes"] = {"text_tokens": [16, 32], **manifest["spec"]["axes"]}
    manifest["spec"]["mapping"] = {"text_tokens": "prompt", "tier": "model"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert load_runs([run]).axes == ["tier", "top_k", "blocks"]
