"""The closed form: prefill = a + b·n + c·n², decode = a + b·p, least squares on relative error.

Two forms. Per config (`group_column=None`): every config its own a, b, c (the study's `closed_form` reference).
Physics (`group_column="tier"` or `"model"`): each config its own fixed cost a (sampling, scheduling), while the
per-token cost b and the attention cost c are one per model, shared by all of that model's configs, so every
config's lengths pin them down together. The product's `residual` variant multiplies its trees by the physics
form (the study's `physics` reference is the same fit); either way the coefficients are stored per config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from estimator.errors import EstimatorError
from estimator.model.features import Phase, config_key

_SCALE = 1000.0  # fit on x/1000 for conditioning; coefficients are stored per token / per token²
MODEL_COLUMNS = ("tier", "model")  # the config axis naming the model, in order of preference


def model_group(axes: Sequence[str]) -> str | None:
    """The axis naming the model (`tier`, else `model`): the physics form has its length terms per value."""
    return next((a for a in MODEL_COLUMNS if a in axes), None)


class ClosedForm:
    """Least squares per config: prefill = a + b·n + c·n² (n = text_tokens), decode = a + b·p (p = position).

    Fitted on relative error (rows reweighted by 1/fitted latency) with non-negative coefficients (NNLS), so
    the fit never predicts latency falling with length and extrapolates safely; configs not seen in training
    fall back to the pooled fit.
    """

    def __init__(
        self,
        phase: Phase,
        config_columns: Sequence[str],
        display_columns: Sequence[str] = (),
        group_column: str | None = None,
    ) -> None:
        self.phase: Phase = phase
        self.config_columns = list(config_columns)
        self.group_column = group_column if group_column in self.config_columns else None
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
        degree = min(self.degree, len(np.unique(x)) - 1)
        xs = x / _SCALE
        design = np.column_stack([xs**k for k in range(degree + 1)])
        coef_scaled = _relative_nnls(design, y)
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
        groups = list(frame.groupby(self.config_columns, sort=True).indices.values())
        for idx in groups:
            first = frame.iloc[int(idx[0])]
            k = config_key(first, self.config_columns)
            if self.group_column is None:  # the physics form fits every config at once below
                self.coef[k] = self._fit_one(x_all[idx], y_all[idx])
            self.configs[k] = {c: _plain(first[c]) for c in self.display_columns if c in frame.columns}
            self.rows[k] = len(idx)
        if self.group_column is not None:
            self._fit_physics(frame, groups, x_all, y_all)
        return self

    def _fit_physics(
        self, frame: pd.DataFrame, groups: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray
    ) -> None:
        """Every config in one least squares: an intercept per config, the length terms per model (`group_column`)."""
        assert self.group_column is not None
        keys = [config_key(frame.iloc[int(idx[0])], self.config_columns) for idx in groups]
        model_of = [str(frame[self.group_column].iloc[int(idx[0])]) for idx in groups]
        models = sorted(set(model_of))
        cfg = np.empty(len(frame), dtype=np.int64)
        for i, idx in enumerate(groups):
            cfg[idx] = i
        grp = np.array([models.index(m) for m in model_of])[cfg]
        xs, rows = x / _SCALE, np.arange(len(frame))
        nc, ng = len(groups), len(models)
        design = np.zeros((len(frame), nc + ng * self.degree))
        design[rows, cfg] = 1.0
        for d in range(1, self.degree + 1):
            design[rows, nc + (d - 1) * ng + grp] = xs**d
        coef = _relative_nnls(design, y)
        for i, k in enumerate(keys):
            g = models.index(model_of[i])
            scaled = [coef[i], *(coef[nc + (d - 1) * ng + g] for d in range(1, self.degree + 1))]
            self.coef[k] = np.asarray(scaled) / _SCALE ** np.arange(self.degree + 1)

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


def _relative_nnls(design: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative error: refitted twice with rows weighted by 1/fit (not 1/y: a few
    near-zero measured steps would then dominate), so it minimises percentage error, as MAPE scores it, instead of
    letting the longest prompts' milliseconds dominate."""
    from scipy.optimize import nnls

    coef, _ = nnls(design, y)
    floor = max(float(np.median(y)) * 1e-3, 1e-6)
    for _ in range(2):
        w = 1.0 / np.maximum(design @ coef, floor)
        coef, _ = nnls(design * w[:, None], y * w)
    return np.asarray(coef)
