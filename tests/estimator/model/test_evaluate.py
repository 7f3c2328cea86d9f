"""Metrics against hand-computed values, the two held-out splits, and the closed-form reference."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from estimator.data.runs import load_runs
from estimator.errors import EstimatorError
from estimator.model.closed_form import ClosedForm
from estimator.model.evaluation import (
    error_metrics,
    length_cutoff,
    mae_ms,
    mape_pct,
    p90_ape_pct,
    r2_score,
    split_by_length,
    split_by_prompt,
)


def test_metrics_hand_computed() -> None:
    y = np.array([10.0, 20.0, 40.0])
    yhat = np.array([11.0, 18.0, 40.0])
    assert mape_pct(y, yhat) == pytest.approx(20.0 / 3)
    assert mae_ms(y, yhat) == pytest.approx(1.0)
    # SS_tot = 13.33² + 3.33² + 16.67² = 466.67, SS_res = 1 + 4 + 0 = 5
    assert r2_score(y, yhat) == pytest.approx(1 - 5 / (1400 / 3))


def test_p90_interpolates_and_constant_r2_is_nan() -> None:
    y = np.full(5, 100.0)
    yhat = np.array([100.0, 110.0, 80.0, 130.0, 60.0])  # APE 0, 10, 20, 30, 40 %
    assert p90_ape_pct(y, yhat) == pytest.approx(36.0)
    m = error_metrics(y, yhat)
    assert m["mape_pct"] == pytest.approx(20.0) and m["mae_ms"] == pytest.approx(20.0)
    assert math.isnan(m["r2"])
    with pytest.raises(EstimatorError, match="positive"):
        mape_pct(np.array([0.0]), np.array([1.0]))


def test_prompt_split_has_no_shared_prompt_and_matches_across_phases(synthetic_run: Path) -> None:
    rs = load_runs([synthetic_run])
    pre, dec = rs.phase("prefill"), rs.phase("decode")
    sp, sd = split_by_prompt(pre, 0.25, seed=3), split_by_prompt(dec, 0.25, seed=3)
    for frame, split in ((pre, sp), (dec, sd)):
        train_ids = set(frame.iloc[split.train]["prompt_id"])
        test_ids = set(frame.iloc[split.test]["prompt_id"])
        assert train_ids and test_ids and not train_ids & test_ids
        assert len(split.train) + len(split.test) == len(frame)
    assert set(pre.iloc[sp.test]["prompt_id"]) == set(dec.iloc[sd.test]["prompt_id"])
    assert set(pre.iloc[sp.test]["prompt_id"]) == set(
        pre.iloc[split_by_prompt(pre, 0.25, 3).test]["prompt_id"]
    )


def test_length_split_trains_short_tests_long(synthetic_run: Path) -> None:
    pre = load_runs([synthetic_run]).phase("prefill")
    split = split_by_length(pre, 0.25)
    train_max = pre.iloc[split.train]["text_tokens"].max()
    test_min = pre.iloc[split.test]["text_tokens"].min()
    assert train_max < test_min
    assert set(pre.iloc[split.test]["text_tokens"]) == {256, 512}  # a quarter of 6 lengths, rounded up
    assert length_cutoff([16, 32, 64, 128, 256, 512, 1024, 2048]) == 1024


def test_too_few_samples_for_a_split() -> None:
    frame = pd.DataFrame(
        {"prompt_id": ["a", "b", "c"], "text_tokens": [10, 20, 30], "latency_ms": [1.0, 2, 3]}
    )
    with pytest.raises(EstimatorError, match="too few distinct prompts"):
        split_by_prompt(frame)
    with pytest.raises(EstimatorError, match="too few distinct text_tokens"):
        split_by_length(frame.iloc[:2])


def test_closed_form_recovers_coefficients_and_falls_back() -> None:
    n = np.array([10, 50, 100, 200, 400, 800] * 2)
    tier = np.repeat([1, 2], 6)
    y = tier * (1.0 + 0.01 * n + 2e-5 * n**2)
    frame = pd.DataFrame({"tier": tier, "text_tokens": n, "latency_ms": y})
    cf = ClosedForm("prefill", ["tier"]).fit(frame)
    coef, seen = cf.coefficients({"tier": 2})
    assert seen
    np.testing.assert_allclose(coef, [2.0, 0.02, 4e-5], rtol=1e-6)
    _, seen = cf.coefficients({"tier": 3})
    assert not seen
    pred = cf.predict({"tier": np.array([1, 3]), "text_tokens": np.array([100, 100])}, 2)
    assert pred[0] == pytest.approx(1 + 1 + 0.2)
    again = ClosedForm.from_records("prefill", ["tier"], cf.to_records(), cf.pooled_record())
    np.testing.assert_allclose(again.predict({"tier": tier, "text_tokens": n}, len(n)), y, rtol=1e-6)


def test_closed_form_never_decreases_with_length() -> None:
    p = np.arange(100, 140)
    y = 5.0 - 0.01 * (p - 100)  # falling latency: NNLS keeps the slope at zero
    cf = ClosedForm("decode", ["tier"]).fit(pd.DataFrame({"tier": 1, "position": p, "latency_ms": y}))
    coef, _ = cf.coefficients({"tier": 1})
    assert coef[1] >= 0
