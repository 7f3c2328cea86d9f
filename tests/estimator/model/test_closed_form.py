"""The closed form's two fits: per config, and the physics form (a per config, length terms per model) that the
product's residual variant multiplies its trees by."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from estimator.model.closed_form import ClosedForm, model_group


def _prefill_rows(seed: int = 0) -> pd.DataFrame:
    """Tier 1 with two configs sharing b and c (one model) but not a; top_k=50 was profiled only up to 256 tokens.
    Tier 2 has its own b and c. 2% multiplicative noise."""
    rng = np.random.default_rng(seed)
    rows = []
    truth = {(1, 0): (3.0, 0.05, 4e-5), (1, 50): (5.0, 0.05, 4e-5), (2, 0): (6.0, 0.11, 9e-5)}
    lengths = {(1, 0): [32, 64, 128, 256, 512, 1024], (1, 50): [32, 64, 128, 256], (2, 0): [32, 128, 512, 1024]}
    for (tier, top_k), (a, b, c) in truth.items():
        for n in lengths[(tier, top_k)]:
            for _ in range(4):
                ms = (a + b * n + c * n * n) * rng.normal(1.0, 0.02)
                rows.append({"tier": tier, "top_k": top_k, "text_tokens": n, "latency_ms": ms})
    return pd.DataFrame(rows)


def _predict(cf: ClosedForm, tier: int, top_k: int, n: int) -> float:
    cols = {"tier": np.array([tier]), "top_k": np.array([top_k]), "text_tokens": np.array([float(n)])}
    return float(cf.predict(cols, 1)[0])


def test_model_group_prefers_tier() -> None:
    assert model_group(["top_k", "model", "tier"]) == "tier"
    assert model_group(["model", "blocks"]) == "model"
    assert model_group(["blocks"]) is None


def test_physics_form_extrapolates_a_config_from_its_models_other_configs() -> None:
    rows = _prefill_rows()
    physics = ClosedForm("prefill", ["tier", "top_k"], group_column="tier").fit(rows)
    per_config = ClosedForm("prefill", ["tier", "top_k"]).fit(rows)
    true_1024 = 5.0 + 0.05 * 1024 + 4e-5 * 1024**2  # top_k=50 at a length it never saw
    assert _predict(physics, 1, 50, 1024) == pytest.approx(true_1024, rel=0.03)
    per_config_err = abs(_predict(per_config, 1, 50, 1024) / true_1024 - 1)
    physics_err = abs(_predict(physics, 1, 50, 1024) / true_1024 - 1)
    assert physics_err < per_config_err  # 4 short lengths alone pin down c poorly
    # shared length terms within a model, its own fixed cost per config; the other model keeps its own terms
    k0, k50, k2 = (physics.coefficients({"tier": t, "top_k": k})[0] for t, k in ((1, 0), (1, 50), (2, 0)))
    assert k0[1:] == pytest.approx(k50[1:]) and k0[0] != pytest.approx(k50[0], rel=0.1)
    assert k2[2] == pytest.approx(9e-5, rel=0.2) and k0[2] == pytest.approx(4e-5, rel=0.2)


def test_physics_form_is_stored_per_config_and_reloads_exactly() -> None:
    physics = ClosedForm("prefill", ["tier", "top_k"], group_column="tier").fit(_prefill_rows(1))
    again = ClosedForm.from_records("prefill", ["tier", "top_k"], physics.to_records(), physics.pooled_record())
    for tier, top_k in ((1, 0), (1, 50), (2, 0)):
        for n in (16, 300, 2048):
            assert _predict(again, tier, top_k, n) == pytest.approx(_predict(physics, tier, top_k, n), rel=1e-12)


def test_without_the_model_axis_the_fit_is_per_config() -> None:
    rows = _prefill_rows().drop(columns=["tier"])
    grouped = ClosedForm("prefill", ["top_k"], group_column="tier").fit(rows)  # no tier among the config columns
    plain = ClosedForm("prefill", ["top_k"]).fit(rows)
    assert grouped.group_column is None
    for k in plain.coef:
        assert grouped.coef[k] == pytest.approx(plain.coef[k])
