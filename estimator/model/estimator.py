"""The trained latency estimator (`LatencyEstimator`): what a scheduler imports.

Its jobs live beside it: the saved folder (`estimator.model.saved`: files, digests, no pickle), the check of a
config and lengths against the training data (`estimator.model.gate`), the compiled tables (`estimator.model.
tables`) and the booster (`estimator.model.booster`). This class only answers questions.

Two paths answer a question:
- the tables (every variant but `embedding`, every trained config): a binary search and an index, microseconds,
  no LightGBM, no DataFrame;
- the general path (LightGBM's booster, loaded on first use): the embedding variant, and configs the tables do not
  hold (only reachable with `allow_unseen=True`); it says so once with a warning.

Configs and lengths outside the training data are refused (EstimatorError naming the value and the trained ones)
unless `allow_unseen=True`, which answers and flags the unseen values. Lengths beyond the trained range are
answered by a variant that extrapolates (`residual`, shaped by the closed form) with a note.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from estimator.errors import EstimatorError
from estimator.model.booster import PhaseModel, baseline_ms, embeddings_of, request_rows
from estimator.model.embedding import EMBEDDING_MODEL, Projection
from estimator.model.features import Phase, as_columns, check_values
from estimator.model.gate import LENGTH_KEYS, Checked, ConfigGate
from estimator.model.iteration import Composition, IterationEstimator
from estimator.model.meta import ModelMeta
from estimator.model.saved import load_saved, save_estimator
from estimator.model.tables import TABLE_VARIANTS, CompiledTables, compile_tables


class RequestPrediction(NamedTuple):
    """Predicted latency of one request: the prefill step plus `decode_steps` decode steps (ms).

    `unseen` names the values outside the training data that `allow_unseen=True` let through (a best guess).
    A named tuple: immutable, and the cheapest record Python builds on the scheduler's path."""

    prefill_ms: float
    decode_ms_total: float
    total_ms: float
    decode_steps: int
    warnings: tuple[str, ...] = ()
    unseen: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "prefill_ms": self.prefill_ms,
            "decode_ms_total": self.decode_ms_total,
            "total_ms": self.total_ms,
            "decode_steps": self.decode_steps,
            "warnings": list(self.warnings),
            "unseen": list(self.unseen),
        }


@dataclass(frozen=True)
class RequestBatch:
    """`predict_requests`' answer: one entry per request (ms). `unseen[k]` is true where request k used a value
    outside the training data (only with allow_unseen=True); `unseen_values` names those values."""

    prefill_ms: np.ndarray
    decode_ms_total: np.ndarray
    total_ms: np.ndarray
    unseen: np.ndarray
    unseen_values: tuple[str, ...] = ()


class LatencyEstimator:
    """Predicts prefill latency and per-position decode latency (ms) for a serving config.

    Load with `LatencyEstimator.load(path)`; a scheduler needs nothing else from this package.
    """

    def __init__(
        self,
        meta: ModelMeta,
        models: Mapping[Phase, PhaseModel],
        projection: Projection | None = None,
        tables: CompiledTables | None = None,
    ) -> None:
        self.meta = meta
        self.models = dict(models)
        self.projection = projection
        if tables is None and meta.variant in TABLE_VARIANTS:
            tables = compile_tables(self.models, meta.training.configs, meta.axes, meta.variant)
        self.tables = tables
        self.iteration: IterationEstimator | None = None  # the batch-level model, when the folder has one
        self.gate = ConfigGate(meta, tables, text_features=projection is not None)
        self.ranges = self.gate.ranges
        self._row_memo: dict[tuple[Any, ...], Checked] = {}  # a one-row question's config, by its values
        self._row_cols = tuple(meta.config_columns)

    def save(self, path: Path | str) -> Path:
        """Write `prefill.txt`, `decode.txt`, `tables.npz` and `meta.json` into the folder `path` (created)."""
        return save_estimator(self.meta, self.models, self.tables, path)

    @classmethod
    def load(cls, path: Path | str) -> LatencyEstimator:
        """Load a saved estimator; any inconsistency is an EstimatorError with one line."""
        saved = load_saved(path)
        est = cls(saved.meta, saved.models, saved.projection, saved.tables)
        est.iteration = saved.iteration
        return est

    @property
    def variant(self) -> str:
        return self.meta.variant

    def complete_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """`config` with missing non-feature config columns (e.g. `model`) filled from the one trained config
        that matches; missing feature axes stay missing (an error when predicting)."""
        return self.gate.complete(config)

    # -------------------------------------------------------------- predictions

    def predict_request(
        self,
        config: Mapping[str, Any],
        text_tokens: int,
        new_tokens: int,
        text: str | None = None,
        warn: bool = False,
        allow_unseen: bool = False,
    ) -> RequestPrediction:
        """Whole-request latency (ms): prefill + the `new_tokens - 1` decode steps that follow it, exact.

        From the tables, a few lookups whatever `new_tokens` is (decode prefix sums over position); on the general
        path, every decode step through the booster."""
        cfg = self.gate.checked(config)
        n, new = int(text_tokens), int(new_tokens)
        if n <= 0:
            raise EstimatorError(f"text_tokens must be > 0, got {text_tokens}")
        if new < 1:
            raise EstimatorError(f"new_tokens must be >= 1, got {new_tokens}")
        steps = new - 1
        gate = self.gate
        if cfg.fast and steps <= gate.steps_max and gate.in_range(n, n + steps if steps else None):
            # the scheduler's path: a trained config, trained lengths, nothing to say
            t, row = self.tables, cfg.table
            prefill = t.prefill_ms(row, n)  # type: ignore[union-attr, arg-type]
            decode = t.decode_sum_ms(row, n, steps)  # type: ignore[union-attr, arg-type]
            return RequestPrediction(prefill, decode, prefill + decode, steps)
        unseen_lengths, notes = self.gate.lengths(n, n + steps if steps else None)
        unseen = self.gate.admit(cfg, unseen_lengths, allow_unseen)
        if steps > self.gate.steps_max:
            notes.append(f"{steps} decode steps, trained on at most {self.gate.steps_max} per request")
        t = self.tables
        if cfg.table is not None and t is not None and self.projection is None:
            prefill = t.prefill_ms(cfg.table, n)
            decode = t.decode_sum_ms(cfg.table, n, steps)
        else:
            prefill = float(self._general("prefill", cfg.config, n, text, None)[0])
            positions = n + np.arange(1, steps + 1, dtype=np.int64)
            decode = float(self._general("decode", cfg.config, n, text, positions).sum()) if steps else 0.0
        if warn:
            for note in (*notes, *(f"unseen: {u}" for u in unseen)):
                warnings.warn(note, stacklevel=2)
        return RequestPrediction(prefill, decode, prefill + decode, steps, tuple(notes), unseen)

    def decode_positions(
        self,
        config: Mapping[str, Any],
        text_tokens: int,
        new_tokens: int,
        text: str | None = None,
        allow_unseen: bool = False,
    ) -> np.ndarray:
        """Per-step decode latencies (ms) of a request, steps 1..new_tokens-1 (one entry per step)."""
        cfg = self.gate.checked(config)
        n, steps = int(text_tokens), max(int(new_tokens) - 1, 0)
        self.gate.admit(cfg, self.gate.lengths(n, n + steps if steps else None)[0], allow_unseen)
        positions = n + np.arange(1, steps + 1, dtype=np.int64)
        if not steps:
            return np.zeros(0)
        if cfg.table is not None and self.tables is not None and self.projection is None:
            return self.tables.decode_steps(cfg.table, n, positions)
        return self._general("decode", cfg.config, n, text, positions)

    def predict_iteration(self, config: Mapping[str, Any], composition: Mapping[str, Any] | Composition) -> float:
        """Latency (ms) of one engine iteration under continuous batching, from its composition: prefill chunks
        (or prefill_tokens and prefill_sq_sum) and decode contexts (or num_decode_seqs and decode_ctx_sum).
        Needs an iteration model in the folder (`estimate train RUN --target iteration --out FOLDER`)."""
        if self.iteration is None:
            raise EstimatorError(
                "this model folder has no iteration model: train one with `estimate train RUN --target iteration`"
            )
        return self.iteration.predict_iteration(config, composition)

    def predict_requests(
        self,
        configs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        text_tokens: Sequence[int] | np.ndarray,
        new_tokens: Sequence[int] | np.ndarray,
        allow_unseen: bool = False,
    ) -> RequestBatch:
        """Many requests at once: one config for all, or one per request. Vectorised over the tables."""
        n = np.asarray(text_tokens, dtype=np.int64)
        new = np.asarray(new_tokens, dtype=np.int64)
        if n.shape != new.shape or n.ndim != 1:
            raise EstimatorError("text_tokens and new_tokens must be 1-d and of equal length")
        if len(n) and (n.min() <= 0 or new.min() < 1):
            raise EstimatorError("text_tokens must be > 0 and new_tokens >= 1")
        distinct: list[Checked] = []
        if isinstance(configs, Mapping):
            distinct.append(self.gate.checked(configs))
            which = np.zeros(len(n), dtype=np.int64)
        else:
            if len(configs) != len(n):
                raise EstimatorError(f"{len(configs)} configs for {len(n)} requests")
            slot: dict[int, int] = {}
            order = []
            for c in configs:
                s = slot.get(id(c))
                if s is None:
                    s = slot[id(c)] = len(distinct)
                    distinct.append(self.gate.checked(c))
                order.append(s)
            which = np.asarray(order, dtype=np.int64)
        steps = new - 1
        lo, hi = self.gate.t_range
        out_len = (n < lo) | (n > hi) | ((steps > 0) & (n + steps > self.gate.p_max))
        if self.gate.extrapolates:
            out_len[:] = False  # answered by the closed form's shape, not a guess
        flagged = np.array([bool(c.unseen) for c in distinct])[which] | out_len
        if flagged.any():
            k = int(np.flatnonzero(flagged)[0])  # the first request outside the training data names the problem
            last = int(n[k] + steps[k]) if steps[k] else None
            self.gate.admit(distinct[which[k]], self.gate.lengths(int(n[k]), last)[0], allow_unseen)
        for d in distinct:
            if d.table is None and self.tables is not None:
                self.gate.admit(d, [], True)  # warns once that the booster answers
        unseen_values = sorted({u for d in distinct for u in d.unseen})
        if out_len.any():
            unseen_values.append(f"lengths outside the trained text_tokens {lo}..{hi} / positions <= {self.gate.p_max}")
        use_table = np.array([c.table is not None and self.projection is None for c in distinct])
        table_of = np.array([c.table if c.table is not None else -1 for c in distinct], dtype=np.int64)
        fast = use_table[which]
        prefill = np.empty(len(n))
        decode = np.zeros(len(n))
        if fast.any() and self.tables is not None:
            rows = table_of[which[fast]]
            prefill[fast] = self.tables.prefill_many(rows, n[fast])
            decode[fast] = self.tables.decode_sum_many(rows, n[fast], steps[fast])
        for k in np.flatnonzero(~fast):
            r = self.predict_request(distinct[which[k]].config, int(n[k]), int(new[k]), allow_unseen=True)
            prefill[k], decode[k] = r.prefill_ms, r.decode_ms_total
        return RequestBatch(prefill, decode, prefill + decode, flagged, tuple(unseen_values))

    def predict_prefill(self, rows: Mapping[str, Any] | pd.DataFrame, allow_unseen: bool = False) -> np.ndarray:
        """Prefill latency (ms) per row: config axes + `text_tokens` (+ `text` for the embedding variant).

        One row of plain numbers is a table lookup; columns (arrays, a DataFrame) are checked and predicted
        together."""
        if type(rows) is dict and self.projection is None:
            # the scheduler's path: one row of a config seen before, by its values (the row's length tells a row
            # with another key apart); a first sight goes through the full check below and is remembered
            n = rows.get("text_tokens")
            cfg = self._row_memo.get((len(rows), *map(rows.get, self._row_cols)))
            if cfg is not None and type(n) is int and n > 0 and (allow_unseen or self.gate.in_range(n, None)):
                return np.array([self.tables.prefill_ms(cfg.table, n)])  # type: ignore[union-attr, arg-type]
        if isinstance(rows, Mapping) and self.projection is None and _scalar_row(rows):
            cfg = self.gate.checked({k: v for k, v in rows.items() if k not in LENGTH_KEYS})
            n = int(rows["text_tokens"])
            if n <= 0:
                raise EstimatorError("text_tokens must be a positive number of tokens")
            self.gate.admit(cfg, self.gate.lengths(n, None)[0], allow_unseen)
            if cfg.table is not None and self.tables is not None:
                if cfg.fast and type(rows) is dict and set(rows) - set(self._row_cols) == {"text_tokens"}:
                    self._row_memo[(len(rows), *map(rows.get, self._row_cols))] = cfg
                return np.array([self.tables.prefill_ms(cfg.table, n)])
        return self._predict_rows("prefill", rows, allow_unseen)

    def predict_decode(self, rows: Mapping[str, Any] | pd.DataFrame, allow_unseen: bool = False) -> np.ndarray:
        """Decode-step latency (ms) per row: config axes + `text_tokens` + `position` (+ `text`)."""
        return self._predict_rows("decode", rows, allow_unseen)

    def _predict_rows(self, phase: Phase, rows: Mapping[str, Any] | pd.DataFrame, allow_unseen: bool) -> np.ndarray:
        columns, n = as_columns(rows)
        if n == 0:
            return np.zeros(0)
        check_values(phase, columns)
        if "text_tokens" not in columns:
            raise EstimatorError(f"missing feature 'text_tokens' (needed by the {phase} model)")
        if phase == "decode" and "position" not in columns:
            raise EstimatorError("missing feature 'position' (needed by the decode model)")
        cfg_cols = [c for c in self.meta.config_columns if c in columns]
        tok = np.asarray(columns["text_tokens"], dtype=np.int64)
        pos = np.asarray(columns["position"], dtype=np.int64) if phase == "decode" else None
        if not cfg_cols:
            raise EstimatorError(f"config lacks axis value(s) for {', '.join(self.meta.axes)}")
        groups = pd.DataFrame({c: columns[c] for c in cfg_cols}).groupby(cfg_cols, sort=False, dropna=False).indices
        out = np.empty(n)
        for idx in groups.values():
            cfg = self.gate.checked({c: _plain(columns[c][idx[0]]) for c in cfg_cols})
            t_lo, t_hi = int(tok[idx].min()), int(tok[idx].max())
            p_max = int(pos[idx].max()) if pos is not None else None
            self.gate.admit(cfg, self.gate.lengths(t_lo, None)[0] + self.gate.lengths(t_hi, p_max)[0], allow_unseen)
            if cfg.table is not None and self.tables is not None and self.projection is None:
                if pos is None:
                    out[idx] = self.tables.prefill_many(np.full(len(idx), cfg.table), tok[idx])
                else:
                    for t in np.unique(tok[idx]):
                        sel = idx[tok[idx] == t]
                        out[sel] = self.tables.decode_steps(cfg.table, int(t), pos[sel])
            else:
                sub = {k: v[idx] for k, v in columns.items()}
                out[idx] = self.models[phase].predict(sub, len(idx), embeddings_of(self.projection, sub))
        return out

    def _general(
        self, phase: Phase, config: Mapping[str, Any], text_tokens: int, text: str | None, positions: np.ndarray | None
    ) -> np.ndarray:
        return request_rows(self.models, self.meta.axes, self.projection, phase, config, text_tokens, text, positions)


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _scalar_row(rows: Mapping[str, Any]) -> bool:
    return all(isinstance(v, int | float | str | np.generic) for v in rows.values())


__all__ = [
    "EMBEDDING_MODEL",
    "LatencyEstimator",
    "ModelMeta",
    "PhaseModel",
    "RequestBatch",
    "RequestPrediction",
    "baseline_ms",
]
