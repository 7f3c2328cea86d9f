"""Trained tree models compiled into exact lookup tables: a prediction is a binary search and an index.

A LightGBM model over the config axes plus `text_tokens` (and `position` for decode) is piecewise constant
between its split thresholds. Every feature that moves with the length (`text_tokens`, its buckets, square root
and square; `position`, its square root and square) is monotone in it, so each split threshold maps back to one
integer breakpoint: the first length whose feature value lies above the threshold. For each trained config the
booster is evaluated once per interval between breakpoints (prefill: per `text_tokens` interval; decode: per
`text_tokens` interval × `position` interval), through the same feature code as the general path, so the table
holds the booster's own outputs. Decode keeps prefix sums over position, so any run of decode steps costs two
lookups and is exact. For the `residual` variant the table holds the trees' factor and the closed form is summed
analytically beside it (prefix sums of a + b·p, floored as the general path floors it).

File `tables.npz` (numpy's zip of .npy arrays, read with allow_pickle=False; sha256 in meta.json), format
TABLES_VERSION, arrays:
  version ()                 int64, TABLES_VERSION
  axes (A,)                  str, the config axes of the keys
  keys (C, A)                str, one row per trained config (`key_part` of each axis value)
  floor_ms ()                float64, the residual variant's closed-form floor
  prefill_t (Tp,)            int64, text_tokens breakpoints, prefill_t[0] = 1
  prefill_value (C, Tp)      float64, ms (residual: the trees' factor)
  decode_t (Td,)             int64, text_tokens breakpoints of the decode model
  decode_p (P,)              int64, position breakpoints, decode_p[0] = 1
  decode_value (C, Td, P)    float64, ms per step (residual: factor)
  decode_prefix (C, Td, P)   float64, sum of the steps at positions < decode_p[j] (ms)
  prefill_cf (C, 3), decode_cf (C, 2), decode_cf_prefix (C, P)   residual only: a, b, c per config and the
                             floored closed-form sum over positions < decode_p[j]
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from estimator.errors import EstimatorError
from estimator.model.features import Phase, config_key

TABLES_VERSION = 1
# The variants whose features are monotone in the lengths (the `embedding` variant depends on the text, the
# `blocks` variant's position % blocks is periodic): only these compile into tables.
TABLE_VARIANTS = frozenset({"tokens", "buckets", "poly", "residual"})
TABLES_FILE = "tables.npz"
MAX_TOKENS = 262_144  # text_tokens domain of the tables: 1..MAX_TOKENS (positions up to 2 × MAX_TOKENS)
FLOOR_MS = 1e-3  # the residual variant's closed-form floor (estimator.model.estimator._MIN_PRED_MS)
_LENGTH_FEATURES = {"text_tokens", "bucket_short", "bucket_log", "text_tokens_sqrt", "text_tokens_sq"}
_POSITION_FEATURES = {"position", "position_sqrt", "position_sq"}


def _thresholds(booster: Any) -> dict[str, list[float]]:
    """Split thresholds per feature name over every tree (numerical splits: left when value <= threshold)."""
    dump = booster.dump_model()
    names = dump["feature_names"]
    out: dict[str, list[float]] = {}
    stack = [t["tree_structure"] for t in dump["tree_info"]]
    while stack:
        node = stack.pop()
        if "split_index" not in node:
            continue
        if node.get("decision_type", "<=") != "<=":
            raise EstimatorError(f"cannot compile a {node.get('decision_type')!r} split into a table")
        out.setdefault(names[node["split_feature"]], []).append(float(node["threshold"]))
        stack += [node["left_child"], node["right_child"]]
    return out


def _breakpoints(values: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Lengths (1-based, values[i] is the feature at length i + 1) where `value <= threshold` turns false."""
    if np.any(np.diff(values) < 0):
        raise EstimatorError("a length feature is not monotone in the length: no exact table")
    first_above = np.searchsorted(values, np.asarray(thresholds, dtype=np.float64), side="right") + 1
    return first_above[(first_above > 1) & (first_above <= len(values))]


def _length_breaks(spec: Any, booster: Any, config: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """Breakpoints in text_tokens and (decode) position of one phase model, from every split threshold."""
    names = spec.names()
    unknown = [n for n in names if n not in spec.axes and n not in _LENGTH_FEATURES | _POSITION_FEATURES]
    if unknown:
        raise EstimatorError(f"features {unknown} are not functions of the length: no exact table")
    thr = _thresholds(booster)
    decode = spec.phase == "decode"
    span = 2 * MAX_TOKENS if decode else MAX_TOKENS
    grid = np.arange(1, span + 1, dtype=np.int64)
    cols: dict[str, np.ndarray] = {a: np.repeat(np.asarray([config[a]]), span) for a in spec.axes}
    cols["text_tokens"] = np.minimum(grid, MAX_TOKENS)
    if decode:
        cols["position"] = grid
    x = spec.matrix(cols, span)
    t_breaks = [np.array([1])]
    p_breaks = [np.array([1])]
    for j, name in enumerate(names):
        if name in thr and name in _LENGTH_FEATURES:
            t_breaks.append(_breakpoints(x[:MAX_TOKENS, j], thr[name]))
        elif name in thr and name in _POSITION_FEATURES:
            p_breaks.append(_breakpoints(x[:, j], thr[name]))
    t = np.unique(np.concatenate(t_breaks)).astype(np.int64)
    return t, (np.unique(np.concatenate(p_breaks)).astype(np.int64) if decode else None)


def _factor(spec: Any, booster: Any, config: Mapping[str, Any], text_tokens: np.ndarray, position: Any) -> np.ndarray:
    """The booster's own output exp(raw) at these rows, as PhaseModel.predict computes it."""
    n = len(text_tokens)
    cols: dict[str, np.ndarray] = {a: np.repeat(np.asarray([config[a]]), n) for a in spec.axes}
    cols["text_tokens"] = text_tokens
    if position is not None:
        cols["position"] = position
    raw = booster.predict(spec.matrix(cols, n), num_threads=1)
    return np.exp(np.asarray(raw, dtype=np.float64))


def floored_linear_sum(a: float, b: float, end: int, floor: float = FLOOR_MS) -> float:
    """Sum of max(a + b·q, floor) over q = 1 .. end - 1 (0 when end <= 1)."""
    n = end - 1
    if n <= 0:
        return 0.0

    def plain(lo: int, hi: int) -> float:  # sum of a + b·q over q = lo..hi
        return a * (hi - lo + 1) + b * (hi * (hi + 1) / 2.0 - (lo - 1) * lo / 2.0) if hi >= lo else 0.0

    if b == 0:
        return n * max(a, floor)
    edge = (floor - a) / b  # a + b·q >= floor from q >= edge (b > 0) or up to q <= edge (b < 0)
    if b > 0:
        first = min(max(1, math.ceil(edge)), n + 1)
        return floor * (first - 1) + plain(first, n)
    last = max(min(n, math.floor(edge)), 0)
    return plain(1, last) + floor * (n - last)


def floored_linear_sum_many(a: np.ndarray, b: np.ndarray, end: np.ndarray, floor: float = FLOOR_MS) -> np.ndarray:
    """`floored_linear_sum` elementwise over arrays."""
    n = np.maximum(end - 1, 0).astype(np.float64)
    a = a.astype(np.float64)
    b = b.astype(np.float64)

    def plain(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        total = a * (hi - lo + 1) + b * (hi * (hi + 1) / 2.0 - (lo - 1) * lo / 2.0)
        return np.where(hi >= lo, total, 0.0)

    with np.errstate(divide="ignore", invalid="ignore"):
        edge = (floor - a) / b
    first = np.minimum(np.maximum(1.0, np.ceil(np.nan_to_num(edge, posinf=1e300, neginf=-1e300))), n + 1)
    last = np.maximum(np.minimum(n, np.floor(np.nan_to_num(edge, posinf=1e300, neginf=-1e300))), 0.0)
    rising = floor * (first - 1) + plain(first, n)
    falling = plain(np.ones_like(n), last) + floor * (n - last)
    flat = n * np.maximum(a, floor)
    return np.where(n <= 0, 0.0, np.where(b > 0, rising, np.where(b < 0, falling, flat)))


@dataclass
class CompiledTables:
    """The tables of one model (see the module docstring), with plain-list copies for scalar lookups."""

    axes: list[str]
    keys: list[tuple[str, ...]]
    residual: bool
    prefill_t: np.ndarray
    prefill_value: np.ndarray
    decode_t: np.ndarray
    decode_p: np.ndarray
    decode_value: np.ndarray
    decode_prefix: np.ndarray
    prefill_cf: np.ndarray | None = None
    decode_cf: np.ndarray | None = None
    decode_cf_prefix: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.index = {k: i for i, k in enumerate(self.keys)}
        self._pt = self.prefill_t.tolist()
        self._pv = self.prefill_value.tolist()
        self._dt = self.decode_t.tolist()
        self._dp = self.decode_p.tolist()
        self._dv = self.decode_value.tolist()
        self._dc = self.decode_prefix.tolist()
        self._pcf = self.prefill_cf.tolist() if self.prefill_cf is not None else None
        self._dcf = self.decode_cf.tolist() if self.decode_cf is not None else None
        self._dcfp = self.decode_cf_prefix.tolist() if self.decode_cf_prefix is not None else None

    def nbytes(self) -> int:
        arrays = [self.prefill_t, self.prefill_value, self.decode_t, self.decode_p, self.decode_value]
        arrays += [self.decode_prefix]
        arrays += [a for a in (self.prefill_cf, self.decode_cf, self.decode_cf_prefix) if a is not None]
        return int(sum(a.nbytes for a in arrays))

    # -------------------------------------------------------------- scalar lookups (the scheduler's path)

    def prefill_ms(self, c: int, text_tokens: int) -> float:
        v = self._pv[c][bisect_right(self._pt, text_tokens) - 1]
        if self._pcf is None:
            return v
        a, b, cc = self._pcf[c]
        return v * max(a + b * text_tokens + cc * text_tokens * text_tokens, FLOOR_MS)

    def _cum(self, c: int, i: int, p: int) -> float:
        """Sum of the decode steps at positions 1 .. p - 1 for text_tokens interval i."""
        j = bisect_right(self._dp, p) - 1
        if self._dcf is None:
            return self._dc[c][i][j] + self._dv[c][i][j] * (p - self._dp[j])
        a, b = self._dcf[c]
        inside = floored_linear_sum(a, b, p) - self._dcfp[c][j]  # type: ignore[index]
        return self._dc[c][i][j] + self._dv[c][i][j] * inside

    def decode_sum_ms(self, c: int, text_tokens: int, steps: int) -> float:
        """Exact sum of the decode steps at positions text_tokens + 1 .. text_tokens + steps."""
        if steps <= 0:
            return 0.0
        i = bisect_right(self._dt, text_tokens) - 1
        return self._cum(c, i, text_tokens + steps + 1) - self._cum(c, i, text_tokens + 1)

    # -------------------------------------------------------------- vectorised lookups (batches)

    def prefill_many(self, c: np.ndarray, text_tokens: np.ndarray) -> np.ndarray:
        out = self.prefill_value[c, np.searchsorted(self.prefill_t, text_tokens, side="right") - 1]
        if self.prefill_cf is not None:
            cf = self.prefill_cf[c]
            n = text_tokens.astype(np.float64)
            out = out * np.maximum(cf[:, 0] + cf[:, 1] * n + cf[:, 2] * n * n, FLOOR_MS)
        return out

    def decode_steps(self, c: int, text_tokens: int, positions: np.ndarray) -> np.ndarray:
        """Per-step decode latency (ms) at these positions (one config, one text_tokens)."""
        i = int(np.searchsorted(self.decode_t, text_tokens, side="right") - 1)
        j = np.searchsorted(self.decode_p, positions, side="right") - 1
        out = self.decode_value[c, i, j]
        if self.decode_cf is not None:
            a, b = self.decode_cf[c]
            out = out * np.maximum(a + b * positions.astype(np.float64), FLOOR_MS)
        return out

    def decode_sum_many(self, c: np.ndarray, text_tokens: np.ndarray, steps: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.decode_t, text_tokens, side="right") - 1

        def cum(p: np.ndarray) -> np.ndarray:
            j = np.searchsorted(self.decode_p, p, side="right") - 1
            if self.decode_cf is None:
                return self.decode_prefix[c, i, j] + self.decode_value[c, i, j] * (p - self.decode_p[j])
            cf = self.decode_cf[c]
            inside = floored_linear_sum_many(cf[:, 0], cf[:, 1], p) - self.decode_cf_prefix[c, j]  # type: ignore[index]
            return self.decode_prefix[c, i, j] + self.decode_value[c, i, j] * inside

        out = cum(text_tokens + steps + 1) - cum(text_tokens + 1)
        return np.where(steps > 0, out, 0.0)

    # -------------------------------------------------------------- save / load

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {
            "version": np.asarray(TABLES_VERSION, dtype=np.int64),
            "axes": np.asarray(self.axes, dtype=str),
            "keys": np.asarray(self.keys, dtype=str).reshape(len(self.keys), len(self.axes)),
            "floor_ms": np.asarray(FLOOR_MS),
            "prefill_t": self.prefill_t,
            "prefill_value": self.prefill_value,
            "decode_t": self.decode_t,
            "decode_p": self.decode_p,
            "decode_value": self.decode_value,
            "decode_prefix": self.decode_prefix,
        }
        if self.residual:
            assert self.prefill_cf is not None and self.decode_cf is not None and self.decode_cf_prefix is not None
            arrays.update(prefill_cf=self.prefill_cf, decode_cf=self.decode_cf, decode_cf_prefix=self.decode_cf_prefix)
        with path.open("wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path, residual: bool) -> CompiledTables:
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as exc:
            raise EstimatorError(f"{path}: unreadable tables ({exc})") from exc
        if int(data.get("version", -1)) != TABLES_VERSION:
            raise EstimatorError(f"{path}: tables version {data.get('version')} (expected {TABLES_VERSION})")
        need = ["axes", "keys", "prefill_t", "prefill_value", "decode_t", "decode_p", "decode_value", "decode_prefix"]
        if residual:
            need += ["prefill_cf", "decode_cf", "decode_cf_prefix"]
        missing = [k for k in need if k not in data]
        if missing:
            raise EstimatorError(f"{path}: tables lack {', '.join(missing)}")
        return cls(
            axes=[str(a) for a in data["axes"]],
            keys=[tuple(str(v) for v in row) for row in data["keys"]],
            residual=residual,
            **{k: data[k] for k in need[2:]},
        )


def compile_tables(
    models: Mapping[Phase, Any], configs: Sequence[Mapping[str, Any]], axes: Sequence[str], variant: str
) -> CompiledTables:
    """Compile the phase models (PhaseModel: spec, booster, closed_form) for every trained config."""
    if variant not in TABLE_VARIANTS:
        raise EstimatorError(f"the {variant} variant's features are not monotone in the length: no exact table")
    residual = variant == "residual"
    pre, dec = models["prefill"], models["decode"]
    seen: dict[tuple[str, ...], Mapping[str, Any]] = {}
    for cfg in configs:
        seen.setdefault(config_key(cfg, axes), cfg)
    keys = sorted(seen)
    first = seen[keys[0]]
    prefill_t, _ = _length_breaks(pre.spec, pre.booster, first)
    decode_t, decode_p = _length_breaks(dec.spec, dec.booster, first)
    assert decode_p is not None
    widths = np.diff(decode_p).astype(np.float64)
    n_c, n_t, n_p = len(keys), len(decode_t), len(decode_p)
    prefill_value = np.empty((n_c, len(prefill_t)))
    decode_value = np.empty((n_c, n_t, n_p))
    decode_prefix = np.zeros((n_c, n_t, n_p))
    prefill_cf = np.empty((n_c, 3)) if residual else None
    decode_cf = np.empty((n_c, 2)) if residual else None
    decode_cf_prefix = np.empty((n_c, n_p)) if residual else None
    for ci, key in enumerate(keys):
        cfg = seen[key]
        prefill_value[ci] = _factor(pre.spec, pre.booster, cfg, prefill_t, None)
        grid_t = np.repeat(decode_t, n_p)
        grid_p = np.tile(decode_p, n_t)
        decode_value[ci] = _factor(dec.spec, dec.booster, cfg, grid_t, grid_p).reshape(n_t, n_p)
        if residual:
            assert prefill_cf is not None and decode_cf is not None and decode_cf_prefix is not None
            prefill_cf[ci] = pre.closed_form.coefficients(cfg)[0]
            a, b = (float(v) for v in dec.closed_form.coefficients(cfg)[0])
            decode_cf[ci] = (a, b)
            decode_cf_prefix[ci] = [floored_linear_sum(a, b, int(p)) for p in decode_p]
            weights = np.diff(decode_cf_prefix[ci])
        else:
            weights = widths
        decode_prefix[ci, :, 1:] = np.cumsum(decode_value[ci, :, :-1] * weights, axis=1)
    return CompiledTables(
        axes=list(axes),
        keys=keys,
        residual=residual,
        prefill_t=prefill_t,
        prefill_value=prefill_value,
        decode_t=decode_t,
        decode_p=decode_p,
        decode_value=decode_value,
        decode_prefix=decode_prefix,
        prefill_cf=prefill_cf,
        decode_cf=decode_cf,
        decode_cf_prefix=decode_cf_prefix,
    )
