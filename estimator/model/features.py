"""Feature builders for the four feature variants (+ the residual variant) of Experiment 2.

Every builder works on plain numpy columns so that one-row predictions stay cheap (no pandas per call).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from estimator.data.runs import Phase
from estimator.errors import EstimatorError

__all__ = ["Phase"]
Variant = Literal["tokens", "buckets", "poly", "embedding", "residual", "blocks"]
VARIANTS: tuple[str, ...] = ("tokens", "buckets", "poly", "embedding", "residual", "blocks")

# The research notes' short-prompt buckets, as inclusive upper bounds: 0–30, 31–50, 51–70, 71–100, 100+.
SHORT_BUCKET_UPPER: tuple[int, ...] = (30, 50, 70, 100)
# Log-spaced lower edges for long prompts: <128, 128–255, 256–511, ..., >= 65536.
LOG_BUCKET_EDGES: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
PCA_DIM = 32


def short_bucket(text_tokens: np.ndarray | Sequence[int]) -> np.ndarray:
    """Index of the notes' bucket (0: 0–30, 1: 31–50, 2: 51–70, 3: 71–100, 4: 100+)."""
    return np.searchsorted(np.asarray(SHORT_BUCKET_UPPER), np.asarray(text_tokens), side="left")


def log_bucket(text_tokens: np.ndarray | Sequence[int]) -> np.ndarray:
    """Index of the log-spaced bucket (0: <128, 1: 128–255, 2: 256–511, ...)."""
    return np.searchsorted(np.asarray(LOG_BUCKET_EDGES), np.asarray(text_tokens), side="right")


def embedding_names(dim: int = PCA_DIM) -> list[str]:
    """Column names of the projected embedding features."""
    return [f"emb_{i:02d}" for i in range(dim)]


def feature_axes(axes: Sequence[str]) -> list[str]:
    """Axes used as model features: `model` is dropped when `tier` is present (each tier names one model)."""
    return [a for a in axes if not (a == "model" and "tier" in axes)]


def axis_categories(samples: pd.DataFrame, axes: Sequence[str]) -> dict[str, list[str]]:
    """Category lists for non-numeric axes (encoded as the value's index)."""
    cats: dict[str, list[str]] = {}
    for a in axes:
        if not pd.api.types.is_numeric_dtype(samples[a]) or pd.api.types.is_bool_dtype(samples[a]):
            cats[a] = sorted({str(v) for v in samples[a].unique()})
    return cats


def as_columns(rows: Mapping[str, Any] | pd.DataFrame) -> tuple[dict[str, np.ndarray], int]:
    """Normalise one dict row, a dict of sequences, or a DataFrame into (name → 1-d array, row count)."""
    if isinstance(rows, pd.DataFrame):
        return {str(c): rows[c].to_numpy() for c in rows.columns}, len(rows)
    cols: dict[str, np.ndarray] = {}
    n: int | None = None
    for k, v in rows.items():
        arr = np.asarray(v)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        cols[str(k)] = arr
    lengths = {len(a) for a in cols.values()}
    scalar_like = {k for k, a in cols.items() if len(a) == 1}
    if len(lengths) > 1:
        many = lengths - {1}
        if len(many) > 1:
            raise EstimatorError(f"columns have different lengths: {sorted(lengths)}")
        n = many.pop()
        for k in scalar_like:
            cols[k] = np.repeat(cols[k], n)
    else:
        n = lengths.pop() if lengths else 0
    return cols, n


@dataclass(frozen=True)
class FeatureSpec:
    """The ordered feature columns of one phase model and how to compute them from raw columns."""

    phase: Phase
    variant: Variant
    axes: tuple[str, ...]
    categories: Mapping[str, Sequence[str]] = field(default_factory=dict)
    embedding_dim: int = PCA_DIM

    def names(self) -> list[str]:
        """Feature names, in matrix column order."""
        names = [*self.axes, "text_tokens"]
        if self.phase == "decode":
            names.append("position")
        if self.variant == "buckets":
            names += ["bucket_short", "bucket_log"]
        elif self.variant == "poly":
            names += ["text_tokens_sqrt", "text_tokens_sq"]
            if self.phase == "decode":
                names += ["position_sqrt", "position_sq"]
        elif self.variant == "embedding":
            names += embedding_names(self.embedding_dim)
        elif self.variant == "blocks":  # the KV cache's block structure (vLLM allocates `blocks` tokens at a time)
            names += ["block_index", "block_offset"] if self.phase == "decode" else ["prompt_blocks"]
        return names

    def raw_inputs(self) -> list[str]:
        """Raw columns a caller must provide (the embedding variant also needs `text` or embeddings)."""
        names = [*self.axes, "text_tokens"]
        if self.phase == "decode":
            names.append("position")
        return names

    def matrix(self, columns: Mapping[str, np.ndarray], n: int, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Feature matrix (n × len(names())) as float64; `embeddings` (n × embedding_dim) for that variant."""
        base = self.raw_inputs()
        extra = {
            "buckets": 2,
            "poly": 4 if self.phase == "decode" else 2,
            "embedding": self.embedding_dim,
            "blocks": 2 if self.phase == "decode" else 1,
        }.get(self.variant, 0)
        out = np.empty((n, len(base) + extra), dtype=np.float64)
        for j, name in enumerate(base):
            if name not in columns:
                raise EstimatorError(f"missing feature {name!r} (needed by the {self.phase} model)")
            values = columns[name]
            if name in self.categories:
                out[:, j] = self._encode(name, values)
            else:
                try:
                    out[:, j] = values.astype(np.float64, copy=False)
                except (TypeError, ValueError) as exc:
                    raise EstimatorError(f"feature {name!r} is not numeric: {values[:1]!r}") from exc
        n_tok = out[:, len(self.axes)]
        j = len(base)
        if self.variant == "buckets":
            out[:, j] = short_bucket(n_tok)
            out[:, j + 1] = log_bucket(n_tok)
        elif self.variant == "poly":
            out[:, j] = np.sqrt(n_tok)
            out[:, j + 1] = n_tok**2
            if self.phase == "decode":
                pos = out[:, len(self.axes) + 1]
                out[:, j + 2] = np.sqrt(pos)
                out[:, j + 3] = pos**2
        elif self.variant == "blocks":
            if "blocks" not in self.axes or "blocks" in self.categories:
                raise EstimatorError("the blocks variant needs a numeric `blocks` axis (the KV-cache block size)")
            size = np.maximum(out[:, self.axes.index("blocks")], 1.0)
            if self.phase == "decode":
                pos = out[:, len(self.axes) + 1]
                out[:, j] = np.floor(pos / size)
                out[:, j + 1] = pos - out[:, j] * size
            else:
                out[:, j] = np.ceil(n_tok / size)
        elif self.variant == "embedding":
            if embeddings is None or embeddings.shape != (n, self.embedding_dim):
                got = None if embeddings is None else embeddings.shape
                raise EstimatorError(f"embedding variant needs ({n}, {self.embedding_dim}) embeddings, got {got}")
            out[:, j:] = embeddings
        return out

    def _encode(self, name: str, values: np.ndarray) -> np.ndarray:
        cats = list(self.categories[name])
        index = {c: i for i, c in enumerate(cats)}
        try:
            return np.fromiter((index[str(v)] for v in values), dtype=np.float64, count=len(values))
        except KeyError as exc:
            raise EstimatorError(f"unknown value {exc.args[0]!r} for axis {name!r} (trained on {cats})") from exc


def config_key(row: Mapping[str, Any], config_columns: Sequence[str]) -> tuple[str, ...]:
    """Hashable key naming one config: the axis values as strings, in `config_columns` order."""
    return tuple(key_part(row[c]) for c in config_columns)


def key_part(value: Any) -> str:
    """String form of one axis value: 1, 1.0 and np.int64(1) all give "1"."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def check_values(phase: Phase, columns: Mapping[str, np.ndarray]) -> None:
    """Impossible inputs are errors: text_tokens <= 0, decode position <= text_tokens."""
    if "text_tokens" in columns:
        tok = np.asarray(columns["text_tokens"], dtype=np.float64)
        if np.any(~np.isfinite(tok)) or np.any(tok <= 0):
            raise EstimatorError("text_tokens must be a positive number of tokens")
        if phase == "decode" and "position" in columns:
            pos = np.asarray(columns["position"], dtype=np.float64)
            if np.any(~np.isfinite(pos)) or np.any(pos <= tok):
                raise EstimatorError("decode position must be greater than text_tokens (position = text_tokens + i)")
