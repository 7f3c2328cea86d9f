"""Held-out splits, error metrics, and the reference models (closed-form fit per config, random forest)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from estimator.errors import EstimatorError
from estimator.features import Phase, config_key

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


def median_call_us(fn: Callable[[], object], calls: int = 200, warmup: int = 3) -> float:
    """Median wall time of `fn()` over `calls` single calls, in µs."""
    for _ in range(warmup):
        fn()
    times = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t0
    return float(np.median(times) * 1e6)


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


# ---------------------------------------------------------------- closed form


_SCALE = 1000.0  # fit on x/1000 for conditioning; coefficients are stored per token / per token²


class ClosedForm:
    """Least squares per config: prefill = a + b·n + c·n² (n = text_tokens), decode = a + b·p (p = position).

    Fitted on relative error (rows reweighted by 1/fitted latency) with non-negative coefficients (NNLS), so
    the fit never predicts latency falling with length and extrapolates safely; configs not seen in training
    fall back to the pooled fit.
    """

    def __init__(
        self, phase: Phase, config_columns: Sequence[str], display_columns: Sequence[str] = ()
    ) -> None:
        self.phase: Phase = phase
        self.config_columns = list(config_columns)
        self.display_columns = [
            *self.config_columns,
            *(c for c in display_columns if c not in config_columns),
        ]
        self.x_column = "text_tokens" if phase == "prefill" else "position"
        self.degree = 2 if phase == "prefill" else 1
        self.coef: dict[tuple[str, ...], np.ndarray] = {}
        self.configs: dict[tuple[str, ...], dict[str, Any]] = {}
        self.rows: dict[tuple[str, ...], int] = {}
        self.pooled = np.zeros(self.degree + 1)

    def _fit_one(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        from scipy.optimize import nnls

        degree = min(self.degree, len(np.unique(x)) - 1)
        xs = x / _SCALE
        design = np.column_stack([xs**k for k in range(degree + 1)])
        # Relative least squares, reweighted by 1/fit (not 1/y: a few near-zero measured steps would then
        # dominate): minimises percentage error, as MAPE scores it, instead of letting the longest prompts'
        # milliseconds dominate.
        coef_scaled, _ = nnls(design, y)
        for _ in range(2):
            w = 1.0 / np.maximum(design @ coef_scaled, max(float(np.median(y)) * 1e-3, 1e-6))
            coef_scaled, _ = nnls(design * w[:, None], y * w)
        coef = np.zeros(self.degree + 1)
        coef[: degree + 1] = coef_scaled / _SCALE ** np.arange(degree + 1)
        return coef

    def fit(self, frame: pd.DataFrame) -> ClosedForm:
        """Fit per config on `frame` (rows of this phase) plus the pooled fallback."""
        if frame.empty:
            raise EstimatorError(f"no {self.phase} rows to fit the closed form on")
        x_all = frame[self.x_column].to_numpy(dtype=np.float64)
        y_all = frame["latency_ms"].to_numpy(dtype=np.float64)
        self.pooled = self._fit_one(x_all, y_all)
        for idx in frame.groupby(self.config_columns, sort=True).indices.values():
            first = frame.iloc[int(idx[0])]
            k = config_key(first, self.config_columns)
            self.coef[k] = self._fit_one(x_all[idx], y_all[idx])
            self.configs[k] = {c: _plain(first[c]) for c in self.display_columns if c in frame.columns}
            self.rows[k] = len(idx)
        return self

    def coefficients(self, config: Mapping[str, Any]) -> tuple[np.ndarray, bool]:
        """(coefficients, seen) for one config; unseen configs get the pooled fit."""
        k = config_key(config, self.config_columns)
        if k in self.coef:
            return self.coef[k], True
        return self.pooled, False

    def predict(self, columns: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """Predicted latency (ms) per row of raw columns (config columns + text_tokens/position)."""
        missing = [c for c in (*self.config_columns, self.x_column) if c not in columns]
        if missing:
            raise EstimatorError(f"closed form needs column(s) {', '.join(missing)}")
        x = np.asarray(columns[self.x_column], dtype=np.float64)
        coef = np.empty((n, self.degree + 1))
        cfg = {c: np.asarray(columns[c]) for c in self.config_columns}
        if n and all((v == v[0]).all() for v in cfg.values()):  # one config (e.g. one request): one lookup
            coef[:] = self.coef.get(
                config_key({c: v[0] for c, v in cfg.items()}, self.config_columns), self.pooled
            )
        elif n:
            groups = pd.DataFrame(cfg).groupby(self.config_columns, sort=False, dropna=False).indices
            for idx in groups.values():
                first = {c: v[idx[0]] for c, v in cfg.items()}
                coef[idx] = self.coef.get(config_key(first, self.config_columns), self.pooled)
        powers = np.column_stack([x**k for k in range(self.degree + 1)])
        return np.sum(coef * powers, axis=1)

    def to_records(self) -> list[dict[str, Any]]:
        """Per-config coefficients as JSON-ready records."""
        names = (
            ["a_ms", "b_ms_per_token", "c_ms_per_token2"]
            if self.phase == "prefill"
            else [
                "a_ms",
                "b_ms_per_position",
            ]
        )
        return [
            {"config": self.configs[k], "rows": self.rows[k], **dict(zip(names, map(float, c), strict=True))}
            for k, c in self.coef.items()
        ]

    def pooled_record(self) -> list[float]:
        return [float(v) for v in self.pooled]

    @classmethod
    def from_records(
        cls,
        phase: Phase,
        config_columns: Sequence[str],
        records: Sequence[Mapping[str, Any]],
        pooled: Sequence[float],
    ) -> ClosedForm:
        """Rebuild from `to_records()` output."""
        cf = cls(phase, config_columns)
        names = (
            ["a_ms", "b_ms_per_token", "c_ms_per_token2"]
            if phase == "prefill"
            else ["a_ms", "b_ms_per_position"]
        )
        for r in records:
            k = config_key(r["config"], cf.config_columns)
            cf.coef[k] = np.array([float(r[n]) for n in names])
            cf.configs[k] = dict(r["config"])
            cf.rows[k] = int(r.get("rows", 0))
        cf.pooled = np.asarray(pooled, dtype=np.float64)
        if cf.pooled.shape != (cf.degree + 1,):
            raise EstimatorError(f"{phase} pooled closed-form needs {cf.degree + 1} coefficients")
        return cf


def _plain(value: Any) -> Any:
    """numpy scalar → plain Python value (for JSON)."""
    return value.item() if isinstance(value, np.generic) else value


# ---------------------------------------------------------------- random forest


def fit_random_forest(x: np.ndarray, y_ms: np.ndarray, seed: int = 0, n_jobs: int = 2) -> Any:
    """The random-forest reference (sklearn) on the `tokens` features (100 trees, leaves of >= 2 rows)."""
    from sklearn.ensemble import RandomForestRegressor

    forest = RandomForestRegressor(
        n_estimators=100, min_samples_leaf=2, max_features=1.0, n_jobs=n_jobs, random_state=seed
    )
    forest.fit(x, y_ms)
    return forest
