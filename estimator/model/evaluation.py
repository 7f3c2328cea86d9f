"""Error metrics (MAPE, p90 APE, MAE, R²) and the held-out splits (by prompt, by length) used to score models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from estimator.errors import EstimatorError

MIN_PROMPTS_FOR_SPLIT = 4
MIN_LENGTHS_FOR_SPLIT = 3


# ---------------------------------------------------------------- metrics


def ape(y_ms: np.ndarray, yhat_ms: np.ndarray) -> np.ndarray:
    """Absolute percentage error per row, in percent."""
    y = np.asarray(y_ms, dtype=np.float64)
    yhat = np.asarray(yhat_ms, dtype=np.float64)
    if y.shape != yhat.shape:
        raise EstimatorError(f"shape mismatch: {y.shape} vs {yhat.shape}")
    if (y <= 0).any():
        raise EstimatorError("percentage errors need positive measured latencies")
    return np.abs(yhat - y) / y * 100.0


def mape_pct(y_ms: np.ndarray, yhat_ms: np.ndarray) -> float:
    """Mean absolute percentage error, in percent."""
    return float(np.mean(ape(y_ms, yhat_ms)))


def p90_ape_pct(y_ms: np.ndarray, yhat_ms: np.ndarray) -> float:
    """90th percentile of the absolute percentage error, in percent (linear interpolation)."""
    return float(np.percentile(ape(y_ms, yhat_ms), 90))


def mae_ms(y_ms: np.ndarray, yhat_ms: np.ndarray) -> float:
    """Mean absolute error, in ms."""
    return float(np.mean(np.abs(np.asarray(yhat_ms, dtype=np.float64) - np.asarray(y_ms, dtype=np.float64))))


def r2_score(y_ms: np.ndarray, yhat_ms: np.ndarray) -> float:
    """Coefficient of determination (1 - SS_res/SS_tot); nan when y is constant."""
    y = np.asarray(y_ms, dtype=np.float64)
    yhat = np.asarray(yhat_ms, dtype=np.float64)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0:
        return float("nan")
    return 1.0 - float(np.sum((y - yhat) ** 2)) / ss_tot


def error_metrics(y_ms: np.ndarray, yhat_ms: np.ndarray) -> dict[str, float]:
    """R², MAE (ms), MAPE (%) and p90 APE (%) of predictions against measurements."""
    return {
        "r2": r2_score(y_ms, yhat_ms),
        "mae_ms": mae_ms(y_ms, yhat_ms),
        "mape_pct": mape_pct(y_ms, yhat_ms),
        "p90_ape_pct": p90_ape_pct(y_ms, yhat_ms),
        "n": float(len(np.asarray(y_ms))),
    }



# ---------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    """Row indices (into the frame it was made from) of one train/test split."""

    name: str
    train: np.ndarray
    test: np.ndarray
    description: str
    details: dict[str, Any] = field(default_factory=dict)


def test_prompt_ids(
    prompt_ids: Sequence[str] | np.ndarray, test_fraction: float = 0.25, seed: int = 0
) -> set[str]:
    """Prompts held out for testing: GroupShuffleSplit over the sorted unique prompt ids (fixed seed).

    Depends only on the set of prompt ids, so the prefill and decode rows of the same runs get the same split.
    """
    from sklearn.model_selection import GroupShuffleSplit

    uniq = np.array(sorted({str(p) for p in prompt_ids}))
    if len(uniq) < MIN_PROMPTS_FOR_SPLIT:
        raise EstimatorError(
            f"too few distinct prompts for a by-prompt split: {len(uniq)} (need {MIN_PROMPTS_FOR_SPLIT})"
        )
    gss = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    _, test = next(gss.split(uniq, groups=uniq))
    return set(uniq[test].tolist())


def split_by_prompt(frame: pd.DataFrame, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """Hold out whole prompts: no prompt_id has rows on both sides."""
    held = test_prompt_ids(frame["prompt_id"].to_numpy(), test_fraction, seed)
    is_test = frame["prompt_id"].astype(str).isin(held).to_numpy()
    train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    if len(train) == 0 or len(test) == 0:
        raise EstimatorError("by-prompt split left one side empty (too few samples)")
    return Split(
        name="by_prompt",
        train=train,
        test=test,
        description=f"{len(held)} of {frame['prompt_id'].nunique()} prompts held out (seed {seed})",
        details={"test_prompts": len(held), "seed": seed, "test_fraction": test_fraction},
    )


def length_cutoff(text_tokens: Sequence[int] | np.ndarray, test_fraction: float = 0.25) -> int:
    """Smallest text_tokens value of the test side: the top `test_fraction` of the distinct values."""
    uniq = np.unique(np.asarray(text_tokens))
    if len(uniq) < MIN_LENGTHS_FOR_SPLIT:
        raise EstimatorError(
            f"too few distinct text_tokens values for a length split: {len(uniq)} "
            f"(need at least {MIN_LENGTHS_FOR_SPLIT})"
        )
    n_test = min(max(1, int(round(test_fraction * len(uniq)))), len(uniq) - 2)
    return int(uniq[-n_test])


def split_by_length(frame: pd.DataFrame, test_fraction: float = 0.25, cutoff: int | None = None) -> Split:
    """Train on prompts shorter than the cutoff, test on the longer ones (tests extrapolation)."""
    tokens = frame["text_tokens"].to_numpy()
    cut = length_cutoff(tokens, test_fraction) if cutoff is None else cutoff
    train, test = np.flatnonzero(tokens < cut), np.flatnonzero(tokens >= cut)
    if len(train) == 0 or len(test) == 0:
        raise EstimatorError(f"length split at text_tokens >= {cut} left one side empty")
    return Split(
        name="by_length",
        train=train,
        test=test,
        description=f"train text_tokens < {cut}, test >= {cut} (max {int(tokens.max())})",
        details={"cutoff_tokens": cut, "train_max_tokens": int(tokens[train].max())},
    )
