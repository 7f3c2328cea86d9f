"""The batch-level estimator: latency (ms) of one engine iteration from its composition, per engine config.

Shape from the physics of one iteration (DistServe's prefill a + b·Σlen + c·Σlen², plus the decode batch):

    latency_ms = a + b·prefill_tokens + c·Σ prefill_len² + d·num_decode_seqs + e·decode_ctx_sum
                 + f·num_decode_seqs·(max − mean decode context)

fitted per config by non-negative least squares on relative error (as the request-level closed form). It costs
a dot product to evaluate, so `predict_iteration` is in the per-request path's speed class, and it extrapolates
in the direction the physics does. Saved as `iteration.json` (plain JSON, sha256-free: it holds only numbers and
is validated on load), beside a request-level model or alone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from estimator.errors import EstimatorError, one_line_validation_error
from estimator.model.features import config_key, key_part
from estimator.strict import StrictModel

ITERATION_FILE = "iteration.json"
ITERATION_FORMAT = 1
TERMS: tuple[str, ...] = (
    "intercept",
    "prefill_tokens",
    "prefill_sq_sum",
    "num_decode_seqs",
    "decode_ctx_sum",
    "decode_skew_sum",
)
_SCALE = np.array([1.0, 1e3, 1e6, 1.0, 1e3, 1e3])  # conditioning: coefficients are fitted on x / scale


class IterationConfigFit(StrictModel):
    config: dict[str, Any]
    rows: int
    coef_ms: list[float]  # per TERMS, in ms per unit of the term


class IterationMeta(StrictModel):
    format_version: int
    created_at: str
    runs: list[str]
    config_columns: list[str]
    terms: list[str]
    configs: list[IterationConfigFit]
    rows: int
    composition_range: dict[str, list[float]]  # term -> [min, max] seen in training
    held_out: dict[str, float | None] | None = None
    workload_digests: list[str] = []  # sha256 of each training replay's workload.jsonl: validation must not reuse one


@dataclass(frozen=True)
class Composition:
    """What one iteration holds. Give the aggregates, or the lists they come from."""

    prefill_tokens: int = 0
    prefill_sq_sum: float = 0.0
    num_decode_seqs: int = 0
    decode_ctx_sum: int = 0
    decode_ctx_max: int = 0

    @classmethod
    def of(cls, value: Mapping[str, Any] | Composition) -> Composition:
        if isinstance(value, Composition):
            return value
        unknown = set(value) - {"prefill_chunks", "decode_contexts", "decode_ctx_max", *TERMS[1:4], "decode_ctx_sum"}
        if unknown:
            raise EstimatorError(f"unknown composition field(s) {', '.join(sorted(unknown))}")
        chunks = [int(c) for c in value.get("prefill_chunks", ())]
        ctx = [int(c) for c in value.get("decode_contexts", ())]
        if any(c <= 0 for c in chunks) or any(c <= 0 for c in ctx):
            raise EstimatorError("prefill chunks and decode contexts must be positive token counts")
        comp = cls(
            prefill_tokens=int(value.get("prefill_tokens", sum(chunks))),
            prefill_sq_sum=float(value.get("prefill_sq_sum", sum(c * c for c in chunks))),
            num_decode_seqs=int(value.get("num_decode_seqs", len(ctx))),
            decode_ctx_sum=int(value.get("decode_ctx_sum", sum(ctx))),
            decode_ctx_max=int(value.get("decode_ctx_max", max(ctx, default=0))),
        )
        if comp.num_decode_seqs and comp.decode_ctx_max * comp.num_decode_seqs < comp.decode_ctx_sum:
            raise EstimatorError("decode_ctx_max is below the mean decode context: give it, or decode_contexts")
        if min(comp.prefill_tokens, comp.prefill_sq_sum, comp.num_decode_seqs, comp.decode_ctx_sum) < 0:
            raise EstimatorError("composition counts must not be negative")
        if comp.prefill_tokens == 0 and comp.num_decode_seqs == 0:
            raise EstimatorError("an iteration needs at least one prefill token or one decode sequence")
        return comp


def design(frame: pd.DataFrame) -> np.ndarray:
    """The TERMS matrix of an iterations frame (needs prefill_sq_sum beside the harness's columns)."""
    cols = [np.ones(len(frame))] + [frame[t].to_numpy(dtype=np.float64) for t in TERMS[1:]]
    return np.column_stack(cols)


def fit_nnls_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative error (rows reweighted by 1/fit, twice), in unscaled units."""
    from scipy.optimize import nnls

    xs = x / _SCALE[: x.shape[1]]
    used = np.flatnonzero(np.ptp(xs, axis=0) > 0) if len(xs) > 1 else np.arange(xs.shape[1])
    used = np.union1d(used, [0])
    coef = np.zeros(xs.shape[1])
    sub = xs[:, used]
    c, _ = nnls(sub, y)
    for _ in range(2):
        w = 1.0 / np.maximum(sub @ c, max(float(np.median(y)) * 1e-3, 1e-6))
        c, _ = nnls(sub * w[:, None], y * w)
    coef[used] = c
    return coef / _SCALE[: x.shape[1]]


class IterationEstimator:
    """Per-config linear physics model of one engine iteration; `predict_iteration` answers in microseconds."""

    def __init__(self, meta: IterationMeta) -> None:
        self.meta = meta
        self._coef = {config_key(f.config, meta.config_columns): f.coef_ms for f in meta.configs}
        self._memo: dict[Any, list[float]] = {}

    @property
    def trained_configs(self) -> list[dict[str, Any]]:
        return [f.config for f in self.meta.configs]

    def coefficients(self, config: Mapping[str, Any]) -> list[float]:
        """The config's coefficients (ms per unit of each of TERMS); a missing axis is filled from the one
        trained config that matches the others."""
        try:
            token: Any = frozenset(config.items())
            found = self._memo.get(token)
        except TypeError:
            token, found = None, None
        if found is not None:
            return found
        missing = [c for c in self.meta.config_columns if c not in config]
        if missing:  # filled from the one trained config that matches the given values (e.g. `model` from `tier`)
            given = [c for c in self.meta.config_columns if c in config]
            matches = [f.config for f in self.meta.configs if config_key(f.config, given) == config_key(config, given)]
            if len(matches) != 1:
                raise EstimatorError(f"config lacks axis value(s) for {', '.join(missing)}")
            config = {**matches[0], **config}
        coef = self._coef.get(config_key(config, self.meta.config_columns))
        if coef is None:
            trained = "; ".join(
                ", ".join(f"{c}={key_part(f.config[c])}" for c in self.meta.config_columns) for f in self.meta.configs
            )
            shown = {c: config[c] for c in self.meta.config_columns}
            raise EstimatorError(f"config {shown} has no iteration model (trained configs: {trained})")
        if token is not None:
            self._memo[token] = coef
        return coef

    def predict_iteration(self, config: Mapping[str, Any], composition: Mapping[str, Any] | Composition) -> float:
        """Latency (ms) of one iteration of `config` holding `composition` (see `Composition`)."""
        a, b, c, d, e, f = self.coefficients(config)
        comp = Composition.of(composition)
        skew_sum = comp.num_decode_seqs * comp.decode_ctx_max - comp.decode_ctx_sum if comp.num_decode_seqs else 0
        return f * skew_sum + (
            a + b * comp.prefill_tokens + c * comp.prefill_sq_sum + d * comp.num_decode_seqs + e * comp.decode_ctx_sum
        )

    def predict_frame(self, iterations: pd.DataFrame) -> np.ndarray:
        """Latency (ms) per row of an iterations frame (`estimator.data.iterations.with_derived`), per config."""
        x = design(iterations)
        out = np.empty(len(iterations))
        cols = self.meta.config_columns
        groups = iterations.groupby(cols, sort=False).indices if cols else {(): np.arange(len(iterations))}
        for idx in groups.values():
            coef = np.asarray(self.coefficients({c: iterations[c].iloc[int(idx[0])] for c in cols}))
            out[idx] = x[idx] @ coef
        return out

    # -------------------------------------------------------------- save / load

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (ITERATION_FILE + ".tmp")
        tmp.write_text(json.dumps(self.meta.model_dump(mode="json"), indent=1) + "\n")
        os.replace(tmp, folder / ITERATION_FILE)
        return folder

    @classmethod
    def load(cls, folder: Path | str) -> IterationEstimator:
        path = Path(folder) / ITERATION_FILE
        if not path.is_file():
            raise EstimatorError(
                f"{folder}: no iteration model ({ITERATION_FILE}); "
                "train one with `estimate train RUN --target iteration`"
            )
        try:
            meta = IterationMeta.model_validate(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise EstimatorError(f"{path}: unreadable ({exc})") from exc
        except ValidationError as exc:
            raise EstimatorError(f"{path}: invalid iteration model: {one_line_validation_error(exc)}") from exc
        if meta.format_version != ITERATION_FORMAT or meta.terms != list(TERMS):
            raise EstimatorError(
                f"{path}: iteration model format {meta.format_version} / terms {meta.terms} "
                f"(this estimator reads format {ITERATION_FORMAT}, terms {list(TERMS)})"
            )
        if any(len(f.coef_ms) != len(TERMS) or not all(math.isfinite(v) for v in f.coef_ms) for f in meta.configs):
            raise EstimatorError(f"{path}: iteration coefficients are not {len(TERMS)} finite numbers per config")
        return cls(meta)


def fit_iteration_model(
    iterations: pd.DataFrame, config_columns: Sequence[str], runs: Sequence[str], created_at: str
) -> IterationEstimator:
    """Fit the per-config physics model on an iterations frame that carries prefill_sq_sum."""
    x = design(iterations)
    y = iterations["latency_ms"].to_numpy(dtype=np.float64)
    cols = list(config_columns)
    groups = iterations.groupby(cols, sort=True).indices if cols else {(): np.arange(len(iterations))}
    fits = []
    for idx in groups.values():
        first = iterations.iloc[int(idx[0])]
        config = {c: (first[c].item() if isinstance(first[c], np.generic) else first[c]) for c in cols}
        fits.append(
            IterationConfigFit(config=config, rows=len(idx), coef_ms=fit_nnls_relative(x[idx], y[idx]).tolist())
        )
    ranges = {t: [float(x[:, j].min()), float(x[:, j].max())] for j, t in enumerate(TERMS) if j}
    meta = IterationMeta(
        format_version=ITERATION_FORMAT,
        created_at=created_at,
        runs=list(runs),
        config_columns=cols,
        terms=list(TERMS),
        configs=fits,
        rows=len(iterations),
        composition_range=ranges,
    )
    return IterationEstimator(meta)


def workload_digest(run_dir: Path) -> str | None:
    """sha256 of a run's workload.jsonl (replays and serve-bench runs), None for a run without one."""
    import hashlib

    path = Path(run_dir) / "workload.jsonl"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


@dataclass(frozen=True)
class IterationTrainResult:
    path: Path
    estimator: IterationEstimator
    held_out_mape_pct: float | None


def train_iteration_estimator(
    runs: Sequence[Path], out: Path, seed: int = 0, test_fraction: float = 0.25
) -> IterationTrainResult:
    """Fit the iteration model on the batch tables of `runs`, with a held-out MAPE from a by-segment split
    (whole replays / batch points held out), and save `iteration.json` into `out`."""
    import datetime as dt

    from estimator.data.iterations import load_iteration_runs, with_derived

    itset = load_iteration_runs(runs)
    frame = with_derived(itset)
    run_ids = [r.run_id for r in itset.runs]
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    held = None
    groups = frame["_group"].to_numpy()
    uniq = np.unique(groups)
    if len(uniq) >= 4:
        rng = np.random.default_rng(seed)
        test_groups = set(rng.choice(uniq, size=max(1, round(len(uniq) * test_fraction)), replace=False))
        is_test = np.isin(groups, list(test_groups))
        train_rows, test_rows = frame[~is_test], frame[is_test]
        trained = {key_part(v) for v in train_rows[itset.config_columns].astype(str).agg("|".join, axis=1)}
        test_keys = test_rows[itset.config_columns].astype(str).agg("|".join, axis=1).map(key_part)
        test_rows = test_rows[test_keys.isin(trained).to_numpy()]
        if len(test_rows):
            part = fit_iteration_model(train_rows, itset.config_columns, run_ids, stamp)
            y = test_rows["latency_ms"].to_numpy()
            held = float(np.mean(np.abs(part.predict_frame(test_rows) - y) / y) * 100.0)
    est = fit_iteration_model(frame, itset.config_columns, run_ids, stamp)
    est.meta.held_out = {"mape_pct": held} if held is not None else None
    est.meta.workload_digests = sorted({d for d in (workload_digest(r.path) for r in itset.runs) if d})
    return IterationTrainResult(est.save(out), est, held)
