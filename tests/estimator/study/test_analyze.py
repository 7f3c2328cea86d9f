"""Experiment 1: leave-one-out noise floor, CV table and the reading thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from estimator.data.runs import load_runs
from estimator.study.analyze import AnalyzeSpec, analyze, cv_table, loo_ape_pct, noise_floor, reading


def test_loo_ape_hand_computed() -> None:
    frame = pd.DataFrame({"g": ["a", "a", "a", "b"], "latency_ms": [10.0, 12.0, 14.0, 5.0]})
    # 10 vs mean(12, 14) = 13 → 30%; 12 vs 12 → 0%; 14 vs 11 → 3/14; the lone "b" row is skipped
    np.testing.assert_allclose(loo_ape_pct(frame, ["g"]), [30.0, 0.0, 300 / 14])


def test_reading_thresholds() -> None:
    assert reading(9.9) == "token count suffices"
    assert reading(12.0) == "borderline"
    assert reading(15.1) == "more information needed"
    assert reading(float("nan")) == "no data"


def test_noise_floor_and_table_on_synthetic_run(synthetic_run: Path) -> None:
    rs = load_runs([synthetic_run])
    floors = noise_floor(rs.samples, rs.config_columns)
    # synthetic noise is 2% (normal): MAPE of a leave-one-out mean of 2 others ≈ 0.8·2%·sqrt(1.5) ≈ 2%
    assert 1.0 < floors["prefill"].mape_pct < 3.5
    assert floors["decode"].groups == 2 * 2 * 6 * 7  # configs × lengths × decode steps
    table = cv_table(rs.samples, rs.config_columns)
    assert len(table) == 2 * 2 * 6
    assert (table["prefill_n_distinct"] == 4).all() and (table["prefill_n_same"] == 3).all()
    assert table["prefill_cv_distinct_pct"].between(0, 10).all()


def test_analyze_writes_csv_and_json(synthetic_run: Path, tmp_path: Path) -> None:
    result = analyze(AnalyzeSpec(runs=[synthetic_run], out=tmp_path / "a"))
    assert {p.name for p in result.written} == {"analysis.csv", "analysis.json"}
    payload = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert payload["summary"]["prefill"]["verdict"] == "token count suffices"
    assert len(pd.read_csv(tmp_path / "a" / "analysis.csv")) == len(payload["rows"])
    assert AnalyzeSpec(runs=[synthetic_run]).out_dir() == synthetic_run / "analysis"


def test_spec_rejects_missing_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        AnalyzeSpec(runs=[tmp_path / "nope"])
