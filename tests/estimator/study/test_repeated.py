"""Experiment 2 over repeated grouped folds, on synthetic frames with a known shape: the interval rule, the
learners, the folds and the noise-floor correction."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from estimator.study.analyze import loo_ape_pct
from estimator.study.folds import all_folds, by_prompt_folds
from estimator.study.intervals import Interval, corrected_t_interval, decide
from estimator.study.repeated import RepeatedSpec, evaluate_repeated

AXES = ["tier"]
CATEGORIES: dict[str, list[str]] = {}


def synthetic_frames(quadratic: bool, prompts: int = 6, seed: int = 0, noise: float = 0.02) -> dict[str, pd.DataFrame]:
    """Prefill ms = tier·(0.5 + 0.01·n [+ 2e-5·n²]), decode ms = tier·(1.5 + 0.002·p), relative noise."""
    rng = np.random.default_rng(seed)
    pre, dec = [], []
    for tier in (1, 2):
        for n in (16, 32, 64, 128, 192, 256, 384, 512):
            point = f"t{tier}-n{n}"
            for i in range(prompts):
                pid = f"{point}-p{i}"
                base = tier * (0.5 + 0.01 * n + (2e-5 * n * n if quadratic else 0.0))
                common = {"run_id": "r", "point_id": point, "prompt_id": pid, "prompt_kind": "distinct",
                          "tier": tier, "text_tokens": n}
                pre.append({**common, "position": n, "step_index": 0,
                            "latency_ms": base * (1 + noise * rng.standard_normal())})
                for step in (1, 2):
                    dec.append({**common, "position": n + step, "step_index": step,
                                "latency_ms": tier * (1.5 + 0.002 * (n + step)) * (1 + noise * rng.standard_normal())})
    return {"prefill": pd.DataFrame(pre), "decode": pd.DataFrame(dec)}


def _paired(frames: dict[str, pd.DataFrame]) -> dict[tuple[str, str, str], str]:
    spec = RepeatedSpec(k=4, seeds=2, variants=("tokens", "poly"), learners=("ridge", "lightgbm"), references=False)
    res = evaluate_repeated(frames, AXES, CATEGORIES, AXES, spec)
    return {(p.question, p.phase, p.model): p for p in res.paired}, res  # type: ignore[return-value]


def test_quadratic_term_makes_poly_worth_it_for_the_linear_learner() -> None:
    paired, res = _paired(synthetic_frames(quadratic=True))
    p = paired[("by_prompt", "prefill", "ridge:poly")]
    assert p.decision == "worth it", p
    assert p.improvement_pct.low is not None and p.improvement_pct.low > 5
    cells = {(c.question, c.phase, c.model): c for c in res.cells}
    poly, tokens = cells[("by_prompt", "prefill", "ridge:poly")], cells[("by_prompt", "prefill", "ridge:tokens")]
    assert poly.mape_pct.mean < tokens.mape_pct.mean
    # Trees cannot use a monotone transform: identical predictions, reported as holding by construction.
    lgb = paired[("by_prompt", "prefill", "lightgbm:poly")]
    assert lgb.by_construction and lgb.decision == "not worth it"
    assert cells[("by_prompt", "prefill", "lightgbm:poly")].identical_to_tokens is True
    assert any("by construction" in line for line in res.lines)
    # Every figure carries an interval, and the three questions are there.
    assert set(res.folds) == {"by_prompt", "by_length", "longer"}
    for c in res.cells:
        for iv in (c.mape_pct, c.r2, c.mae_ms, c.p90_ape_pct):
            assert iv.low is not None and iv.high is not None and iv.low <= iv.mean <= iv.high


def test_without_the_quadratic_term_poly_is_never_worth_it() -> None:
    paired, _ = _paired(synthetic_frames(quadratic=False))
    for (question, phase, model), p in paired.items():
        if model == "ridge:poly" and question == "by_prompt":
            assert p.decision in ("not worth it", "undecided"), (question, phase, p)


def test_grouped_folds_never_put_a_prompt_on_both_sides() -> None:
    frames = synthetic_frames(quadratic=True, prompts=5)
    folds = by_prompt_folds(frames, k=3, seeds=3)
    assert len(folds) == 9
    for fold in folds:
        for phase, frame in frames.items():
            train = set(frame["prompt_id"].iloc[fold.train[phase]])
            test = set(frame["prompt_id"].iloc[fold.test[phase]])
            assert test and not (train & test)
            assert len(train) + len(test) == frame["prompt_id"].nunique()
    # Each seed's folds partition the prompts.
    seed0 = [f for f in folds if f.seed == 0]
    held = [set(frames["prefill"]["prompt_id"].iloc[f.test["prefill"]]) for f in seed0]
    assert sum(len(h) for h in held) == frames["prefill"]["prompt_id"].nunique()


def test_length_questions() -> None:
    frames = synthetic_frames(quadratic=True, prompts=2)
    folds = all_folds(frames, k=2, seeds=1)
    inner = folds["by_length"]
    assert [int(frames["prefill"]["text_tokens"].iloc[f.test["prefill"]].unique()[0]) for f in inner] == [
        32, 64, 128, 192, 256, 384]
    (longer,) = folds["longer"]
    assert frames["prefill"]["text_tokens"].iloc[longer.test["prefill"]].min() > frames["prefill"][
        "text_tokens"].iloc[longer.train["prefill"]].max()


@pytest.mark.parametrize("n", [2, 3, 8])
def test_noise_floor_correction_recovers_the_noise(n: int) -> None:
    """Repeats y = 10·(1 + σ·N(0,1)): a predictor that knew the mean scores σ·sqrt(2/π) MAPE; the raw
    leave-one-out floor is sqrt(n/(n−1)) times that, the corrected one is not."""
    sigma, groups = 0.05, 6000
    rng = np.random.default_rng(n)
    frame = pd.DataFrame(
        {"g": np.repeat(np.arange(groups), n), "latency_ms": 10.0 * (1 + sigma * rng.standard_normal(groups * n))}
    )
    truth = sigma * math.sqrt(2 / math.pi) * 100.0
    raw = float(np.mean(loo_ape_pct(frame, ["g"])))
    fixed = float(np.mean(loo_ape_pct(frame, ["g"], corrected=True)))
    assert fixed == pytest.approx(truth, rel=0.04)
    assert raw == pytest.approx(truth * math.sqrt(n / (n - 1)), rel=0.04)


def test_decision_rule_on_intervals() -> None:
    def iv(lo: float, hi: float) -> Interval:
        return Interval((lo + hi) / 2, lo, hi, "t", 10)

    assert decide(iv(6, 12), False, 4).decision == "worth it"
    assert decide(iv(-1, 1.5), False, 4).decision == "not worth it"
    d = decide(iv(1, 11), False, 4)  # mean 6: a tighter interval would clear 5%
    assert d.decision == "undecided" and d.prompts_per_point_needed == pytest.approx(4 * (5 / 1) ** 2)
    assert decide(iv(2.5, 4.5), False, 4).prompts_per_point_needed is None  # between the thresholds
    assert decide(iv(6, 12), True, 4).decision == "not worth it"  # by construction wins


def test_corrected_t_interval_is_wider_than_the_naive_one() -> None:
    values = [10.0, 11.0, 9.0, 10.5, 9.5]
    naive = corrected_t_interval(values, 0.0)
    fixed = corrected_t_interval(values, 0.25)
    assert naive.mean == fixed.mean == pytest.approx(10.0)
    assert fixed.high - fixed.low > naive.high - naive.low


def test_physics_shape_extrapolates_where_trees_cannot() -> None:
    """Trained on short prompts of a quadratic prefill, the physics form (attention term per model) and the trees
    on its residual stay within 2× the in-range error on longer prompts; LightGBM on tokens does not."""
    frames = synthetic_frames(quadratic=True, prompts=3)
    spec = RepeatedSpec(k=3, seeds=1, variants=("tokens",), learners=("lightgbm",), references=True)
    res = evaluate_repeated(frames, AXES, CATEGORIES, AXES, spec)
    mape = {(c.question, c.phase, c.model): c.mape_pct.mean for c in res.cells}
    inside = mape[("by_prompt", "prefill", "lightgbm:tokens")]
    for model in ("physics", "physics_trees"):
        assert mape[("longer", "prefill", model)] <= 2 * inside, model
    assert mape[("longer", "prefill", "lightgbm:tokens")] > 4 * inside
    assert any("longer prompts: physics_trees" in line for line in res.lines)
