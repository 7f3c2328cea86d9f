"""The closed-form reference model: prefill = a + b·n + c·n², decode = a + b·p, least squares per config.

Part of the product (the `residual` variant's trees multiply it) as well as the study's reference model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from estimator.errors import EstimatorError
from estimator.model.features import Phase, config_key

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
