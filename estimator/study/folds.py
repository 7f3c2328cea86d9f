"""The three held-out questions of Experiment 2 as folds of row indices, shared by both phases.

- `by_prompt`: k folds grouped by prompt (no prompt on both sides), repeated over seeds; each point's prompts are
  spread over the folds. Each prompt belongs to one (config, length) point, so this asks about new prompts at
  points already measured.
- `by_length`: leave one text_tokens value inside the range out at a time, train on all other lengths (an unseen
  length between measured ones).
- `longer`: train on the shorter lengths, test on the longest quarter of them (extrapolation).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from estimator.errors import EstimatorError
from estimator.model.evaluation import MIN_PROMPTS_FOR_SPLIT, length_cutoff
from estimator.model.features import Phase

QUESTIONS: tuple[str, ...] = ("by_prompt", "by_length", "longer")
QUESTION_TEXT = {
    "by_prompt": "new prompts at measured (config, length) points",
    "by_length": "an unseen length inside the measured range",
    "longer": "prompts longer than any trained on",
}


@dataclass(frozen=True)
class Fold:
    """Row indices per phase of one train/test fold of one question."""

    question: str
    seed: int
    index: int
    train: Mapping[Phase, np.ndarray]
    test: Mapping[Phase, np.ndarray]
    label: str


def prompt_folds(prompt_points: pd.DataFrame, k: int, seed: int) -> dict[str, int]:
    """Fold number per prompt: within each point the prompts are shuffled and dealt round-robin from a random
    start, so every fold holds out prompts of every point that has enough of them."""
    rng = np.random.default_rng(seed)
    out: dict[str, int] = {}
    for _, g in prompt_points.groupby("point", sort=True):
        ids = g["prompt_id"].to_numpy().copy()
        rng.shuffle(ids)
        start = int(rng.integers(0, k))
        for i, pid in enumerate(ids):
            out[str(pid)] = (start + i) % k
    return out


def by_prompt_folds(frames: Mapping[Phase, pd.DataFrame], k: int, seeds: int) -> list[Fold]:
    """k folds grouped by prompt, repeated over `seeds` seeds (0..seeds−1)."""
    pre = frames["prefill"]
    point_cols = [c for c in ("run_id", "point_id") if c in pre.columns] or ["text_tokens"]
    pp = pre[["prompt_id", *point_cols]].drop_duplicates("prompt_id")
    pp = pp.assign(point=pp[point_cols].astype(str).agg("/".join, axis=1))
    if len(pp) < max(MIN_PROMPTS_FOR_SPLIT, k):
        raise EstimatorError(f"too few distinct prompts for {k} folds: {len(pp)}")
    folds = []
    for seed in range(seeds):
        assign = prompt_folds(pp, k, seed)
        fold_of = {p: pd.Series(frames[p]["prompt_id"].astype(str)).map(assign).to_numpy() for p in frames}
        for i in range(k):
            test = {p: np.flatnonzero(fold_of[p] == i) for p in frames}
            train = {p: np.flatnonzero(fold_of[p] != i) for p in frames}
            if any(len(test[p]) == 0 or len(train[p]) == 0 for p in frames):
                continue
            folds.append(Fold("by_prompt", seed, i, train, test, f"seed {seed} fold {i + 1}/{k}"))
    return folds


def by_length_folds(frames: Mapping[Phase, pd.DataFrame]) -> list[Fold]:
    """One fold per text_tokens value strictly inside the measured range: test on it, train on all others."""
    lengths = np.unique(frames["prefill"]["text_tokens"].to_numpy())
    folds = []
    for i, n in enumerate(lengths[1:-1]):
        tok = {p: frames[p]["text_tokens"].to_numpy() for p in frames}
        test = {p: np.flatnonzero(tok[p] == n) for p in frames}
        train = {p: np.flatnonzero(tok[p] != n) for p in frames}
        folds.append(Fold("by_length", 0, i, train, test, f"text_tokens {int(n)} held out"))
    return folds


def longer_folds(frames: Mapping[Phase, pd.DataFrame], test_fraction: float = 0.25) -> list[Fold]:
    """Train on lengths below the cutoff (the longest `test_fraction` of the distinct values), test above it."""
    lengths = frames["prefill"]["text_tokens"].to_numpy()
    try:
        cut = length_cutoff(lengths, test_fraction)
    except EstimatorError:
        return []
    tok = {p: frames[p]["text_tokens"].to_numpy() for p in frames}
    test = {p: np.flatnonzero(tok[p] >= cut) for p in frames}
    train = {p: np.flatnonzero(tok[p] < cut) for p in frames}
    if any(len(test[p]) == 0 or len(train[p]) == 0 for p in frames):
        return []
    top = int(lengths[lengths < cut].max())
    return [Fold("longer", 0, 0, train, test, f"train text_tokens <= {top}, test >= {cut}")]


def all_folds(
    frames: Mapping[Phase, pd.DataFrame], k: int, seeds: int, test_fraction: float = 0.25
) -> dict[str, list[Fold]]:
    """The folds of every question (a question with no possible fold is left out)."""
    out = {
        "by_prompt": by_prompt_folds(frames, k, seeds),
        "by_length": by_length_folds(frames),
        "longer": longer_folds(frames, test_fraction),
    }
    return {q: f for q, f in out.items() if f}
