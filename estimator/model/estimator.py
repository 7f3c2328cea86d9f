"""The trained latency estimator (`LatencyEstimator`): what a scheduler imports.

Layout of `models/<name>/`: `prefill.txt` and `decode.txt` (LightGBM text models), `tables.npz` (the models
compiled into exact lookup tables, `estimator.model.tables`) and `meta.json` (`ModelMeta`, sha256 of every file).

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

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from pydantic import ValidationError

from estimator.data.runs import PHASES
from estimator.errors import EstimatorError, one_line_validation_error
from estimator.model.closed_form import ClosedForm
from estimator.model.embedding import EMBEDDING_MODEL, Projection, embed_texts
from estimator.model.features import (
    PCA_DIM,
    FeatureSpec,
    Phase,
    as_columns,
    check_values,
    config_key,
    embedding_names,
    key_part,
)
from estimator.model.iteration import ITERATION_FILE, Composition, IterationEstimator
from estimator.model.meta import (
    ModelMeta,
    TablesMeta,
    axis_ranges,
    check_meta,
    checked_file,
    closed_form_from_meta,
    number,
    sha256_of,
)
from estimator.model.tables import FLOOR_MS, TABLE_VARIANTS, TABLES_FILE, TABLES_VERSION, CompiledTables, compile_tables

if TYPE_CHECKING:
    import lightgbm as lgb

EXTRAPOLATING_VARIANTS = frozenset({"residual"})  # shaped by the closed form beyond the trained lengths
_LENGTH_KEYS = frozenset({"text_tokens", "position", "text"})


class PhaseModel:
    """One phase's booster with its feature spec; the residual variant multiplies a closed-form baseline.

    With `model_path` and no `booster`, the booster is parsed on first use (the tables answer without it)."""

    def __init__(
        self,
        spec: FeatureSpec,
        booster: lgb.Booster | None = None,
        closed_form: ClosedForm | None = None,
        model_path: Path | None = None,
    ) -> None:
        self.spec = spec
        self._booster = booster
        self.closed_form = closed_form
        self.model_path = model_path

    @property
    def booster(self) -> lgb.Booster:
        if self._booster is None:
            self._booster = _read_booster(self.model_path, self.spec.names())
        return self._booster

    @property
    def target(self) -> Literal["log_latency_ms", "log_ratio_to_closed_form"]:
        return "log_ratio_to_closed_form" if self.spec.variant == "residual" else "log_latency_ms"

    def predict(self, columns: Mapping[str, np.ndarray], n: int, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Latency (ms) per row from raw columns (and projected embeddings for the embedding variant)."""
        x = self.spec.matrix(columns, n, embeddings)
        raw = self.booster.predict(x, num_threads=1)
        out = np.exp(np.asarray(raw, dtype=np.float64))
        if self.spec.variant == "residual":
            if self.closed_form is None:
                raise EstimatorError("residual model without its closed form")
            out = out * baseline_ms(self.closed_form, columns, n)
        return out


def _read_booster(path: Path | None, features: list[str]) -> lgb.Booster:
    import lightgbm as lgb

    if path is None:
        raise EstimatorError("phase model has neither a booster nor a model file")
    try:
        booster = lgb.Booster(model_file=str(path))
    except lgb.basic.LightGBMError as exc:
        raise EstimatorError(f"{path}: unreadable LightGBM model ({exc})") from exc
    if booster.feature_name() != features:
        got = booster.feature_name()
        raise EstimatorError(f"{path}: model features {got} differ from those in meta.json {features}")
    return booster


def baseline_ms(closed_form: ClosedForm, columns: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """Closed-form baseline (ms, floored at 1 µs) that the residual variant's trees multiply."""
    return np.maximum(closed_form.predict(columns, n), FLOOR_MS)


@dataclass(frozen=True)
class RequestPrediction:
    """Predicted latency of one request: the prefill step plus `decode_steps` decode steps (ms).

    `unseen` names the values outside the training data that `allow_unseen=True` let through (a best guess)."""

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


@dataclass
class _Config:
    """A config as validated once: its table row (None: general path), and what was never trained."""

    config: dict[str, Any]
    table: int | None
    unseen: tuple[str, ...]
    error: str | None
    notes: list[str] = field(default_factory=list)


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
        self.ranges = meta.axis_ranges or axis_ranges(meta.training.configs, meta.config_columns)
        self.iteration: IterationEstimator | None = None  # the batch-level model, when the folder has one
        self._configs: dict[Any, _Config] = {}
        self._warned: set[str] = set()
        t = meta.training
        self._t_range = (t.text_tokens_min, t.text_tokens_max)
        self._p_max = t.position_max
        self._extrapolates = meta.variant in EXTRAPOLATING_VARIANTS
        self._trained_keys = {config_key(c, meta.config_columns) for c in t.configs}

    # -------------------------------------------------------------- save / load

    def save(self, path: Path | str) -> Path:
        """Write `prefill.txt`, `decode.txt`, `tables.npz` and `meta.json` into the folder `path` (created)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        for phase, model in self.models.items():
            # tmp + rename, and the digest in meta.json: a kill mid-save never leaves a model that loads half
            target = folder / self.meta.phases[phase].model_file
            tmp_model = target.with_name(target.name + ".tmp")
            model.booster.save_model(str(tmp_model))
            self.meta.phases[phase].sha256 = sha256_of(tmp_model)
            os.replace(tmp_model, target)
        if self.tables is not None:
            target = folder / TABLES_FILE
            tmp_tables = target.with_name(target.name + ".tmp")
            self.tables.save(tmp_tables)
            self.meta.tables = TablesMeta(
                file=TABLES_FILE,
                version=TABLES_VERSION,
                sha256=sha256_of(tmp_tables),
                configs=len(self.tables.keys),
                bytes=self.tables.nbytes(),
            )
            os.replace(tmp_tables, target)
        tmp = folder / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta.model_dump(mode="json"), indent=1) + "\n")
        os.replace(tmp, folder / "meta.json")
        return folder

    @classmethod
    def load(cls, path: Path | str) -> LatencyEstimator:
        """Load a saved estimator; any inconsistency is an EstimatorError with one line."""
        folder = Path(path)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise EstimatorError(f"{folder}: not a model folder (no meta.json)")
        try:
            raw = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EstimatorError(f"{meta_path}: unreadable ({exc})") from exc
        try:
            meta = ModelMeta.model_validate(raw)
        except ValidationError as exc:
            raise EstimatorError(f"{meta_path}: invalid metadata: {one_line_validation_error(exc)}") from exc
        check_meta(meta, meta_path)
        projection = Projection.from_dict(meta.embedding.pca.model_dump()) if meta.embedding else None
        dim = projection.dim if projection else PCA_DIM
        models: dict[Phase, PhaseModel] = {}
        for phase in PHASES:
            pm = meta.phases[phase]
            spec = FeatureSpec(phase, meta.variant, tuple(meta.axes), meta.categories, dim)
            if spec.names() != pm.features:
                raise EstimatorError(
                    f"{meta_path}: {phase} feature list {pm.features} does not match variant {meta.variant!r} "
                    f"with axes {meta.axes}"
                )
            model_path = checked_file(folder, pm.model_file, pm.sha256, "model file")
            cf = closed_form_from_meta(meta, phase) if meta.variant == "residual" else None
            # a model saved without digests is parsed now, so a swapped or damaged file fails here, not mid-use
            booster = _read_booster(model_path, pm.features) if pm.sha256 is None else None
            models[phase] = PhaseModel(spec, booster, cf, model_path)
        tables = None
        if meta.tables is not None:
            tables_path = checked_file(folder, meta.tables.file, meta.tables.sha256, "tables file")
            tables = CompiledTables.load(tables_path, residual=meta.variant == "residual")
            if tables.axes != list(meta.axes) or len(tables.keys) != meta.tables.configs:
                raise EstimatorError(f"{tables_path}: tables do not match meta.json (axes or configs)")
        est = cls(meta, models, projection, tables)
        if (folder / ITERATION_FILE).is_file():
            est.iteration = IterationEstimator.load(folder)
        return est

    # -------------------------------------------------------------- configs: validated once

    @property
    def variant(self) -> str:
        return self.meta.variant

    def complete_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """`config` with missing non-feature config columns (e.g. `model`) filled from the one trained config
        that matches; missing feature axes stay missing (an error when predicting)."""
        out = dict(config)
        missing = [c for c in self.meta.config_columns if c not in out and c not in self.meta.axes]
        if not missing:
            return out
        given = [c for c in self.meta.config_columns if c in out]
        key = config_key(out, given)
        matches = [c for c in self.meta.training.configs if config_key(c, given) == key]
        values = {m: {str(c.get(m)) for c in matches} for m in missing}
        for m in missing:
            if len(values[m]) == 1:
                out[m] = next(c[m] for c in matches)
        return out

    def _config(self, config: Mapping[str, Any]) -> _Config:
        """The validated config (memoised: each distinct config is checked once)."""
        try:
            token: Any = frozenset(config.items())
        except TypeError:
            return self._validate(config)
        found = self._configs.get(token)
        if found is None:
            found = self._configs[token] = self._validate(config)
        return found

    def _validate(self, config: Mapping[str, Any]) -> _Config:
        full = self.complete_config(config)
        unknown = sorted(set(full) - set(self.meta.config_columns) - _LENGTH_KEYS)
        if unknown:
            axes = ", ".join(self.meta.config_columns)
            raise EstimatorError(f"unknown axis {', '.join(unknown)} (model axes: {axes})")
        missing = [a for a in self.meta.axes if a not in full]
        if missing:
            raise EstimatorError(f"config lacks axis value(s) for {', '.join(missing)}")
        unseen: list[str] = []
        messages: list[str] = []
        for col in self.meta.config_columns:
            rng = self.ranges.get(col)
            if col not in full or rng is None:
                continue
            v = full[col]
            if rng.kind == "numeric":
                x = number(v)
                if x is None or not (rng.min is not None and rng.max is not None and rng.min <= x <= rng.max):
                    unseen.append(f"{col}={v}")
                    messages.append(f"{col}={v} is outside the trained range {rng.span()}")
            elif key_part(v) not in rng.values:
                unseen.append(f"{col}={v}")
                messages.append(f"{col}={v} was never trained (trained values: {', '.join(rng.values)})")
        cols = [c for c in self.meta.config_columns if c in full]
        categorical = all(r.kind == "categorical" for c, r in self.ranges.items() if c in cols)
        if not unseen and categorical and config_key(full, cols) not in self._trained_keys_for(cols):
            shown = {c: full[c] for c in cols}
            unseen.append(f"config {shown}")
            messages.append(f"config {shown} was never trained (each value was, not together)")
        table = None
        if self.tables is not None:
            table = self.tables.index.get(config_key(full, self.meta.axes))
        error = None
        if messages:
            error = "; ".join(messages) + " (pass allow_unseen=True / --allow-unseen for a best guess)"
        return _Config(full, table, tuple(unseen), error)

    def _trained_keys_for(self, cols: Sequence[str]) -> set[tuple[str, ...]]:
        if list(cols) == list(self.meta.config_columns):
            return self._trained_keys
        return {config_key(c, cols) for c in self.meta.training.configs}

    def _lengths(self, text_tokens: int, last_position: int | None) -> tuple[list[str], list[str]]:
        """(unseen, notes) for lengths outside the trained range; extrapolating variants answer with a note."""
        out: list[str] = []
        lo, hi = self._t_range
        if not lo <= text_tokens <= hi:
            out.append(f"text_tokens={text_tokens} (trained {lo}..{hi})")
        if last_position is not None and last_position > self._p_max:
            out.append(f"decode position {last_position} (trained up to {self._p_max})")
        if out and self._extrapolates:
            return [], [f"{o}: extrapolated by the {self.variant} variant's closed form" for o in out]
        return out, []

    def _admit(self, cfg: _Config, unseen_lengths: list[str], allow_unseen: bool) -> tuple[str, ...]:
        unseen = cfg.unseen + tuple(unseen_lengths)
        if unseen and not allow_unseen:
            parts = [cfg.error.rsplit(" (pass", 1)[0]] if cfg.error else []
            parts += [
                f"{u} is outside the training data and the {self.variant} variant cannot extrapolate"
                for u in unseen_lengths
            ]
            raise EstimatorError("; ".join(parts) + " (pass allow_unseen=True / --allow-unseen for a best guess)")
        if cfg.table is None and self.tables is not None:
            self._warn_once(f"config {cfg.config} is not in the compiled tables: answered by the LightGBM booster")
        return unseen

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)

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
        cfg = self._config(config)
        n, new = int(text_tokens), int(new_tokens)
        if n <= 0:
            raise EstimatorError(f"text_tokens must be > 0, got {text_tokens}")
        if new < 1:
            raise EstimatorError(f"new_tokens must be >= 1, got {new_tokens}")
        steps = new - 1
        unseen_lengths, notes = self._lengths(n, n + steps if steps else None)
        unseen = self._admit(cfg, unseen_lengths, allow_unseen)
        if steps > self.meta.training.decode_steps_max:
            notes.append(f"{steps} decode steps, trained on at most {self.meta.training.decode_steps_max} per request")
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
        cfg = self._config(config)
        n, steps = int(text_tokens), max(int(new_tokens) - 1, 0)
        self._admit(cfg, self._lengths(n, n + steps if steps else None)[0], allow_unseen)
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
        distinct: list[_Config] = []
        if isinstance(configs, Mapping):
            distinct.append(self._config(configs))
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
                    distinct.append(self._config(c))
                order.append(s)
            which = np.asarray(order, dtype=np.int64)
        steps = new - 1
        lo, hi = self._t_range
        out_len = (n < lo) | (n > hi) | ((steps > 0) & (n + steps > self._p_max))
        if self._extrapolates:
            out_len[:] = False  # answered by the closed form's shape, not a guess
        flagged = np.array([bool(c.unseen) for c in distinct])[which] | out_len
        if flagged.any():
            k = int(np.flatnonzero(flagged)[0])  # the first request outside the training data names the problem
            last = int(n[k] + steps[k]) if steps[k] else None
            self._admit(distinct[which[k]], self._lengths(int(n[k]), last)[0], allow_unseen)
        for d in distinct:
            if d.table is None and self.tables is not None:
                self._admit(d, [], True)  # warns once that the booster answers
        unseen_values = sorted({u for d in distinct for u in d.unseen})
        if out_len.any():
            unseen_values.append(f"lengths outside the trained text_tokens {lo}..{hi} / positions <= {self._p_max}")
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
        if isinstance(rows, Mapping) and self.projection is None and _scalar_row(rows):
            cfg = self._config({k: v for k, v in rows.items() if k not in _LENGTH_KEYS})
            n = int(rows["text_tokens"])
            if n <= 0:
                raise EstimatorError("text_tokens must be a positive number of tokens")
            self._admit(cfg, self._lengths(n, None)[0], allow_unseen)
            if cfg.table is not None and self.tables is not None:
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
            cfg = self._config({c: _plain(columns[c][idx[0]]) for c in cfg_cols})
            t_lo, t_hi = int(tok[idx].min()), int(tok[idx].max())
            p_max = int(pos[idx].max()) if pos is not None else None
            self._admit(cfg, self._lengths(t_lo, None)[0] + self._lengths(t_hi, p_max)[0], allow_unseen)
            if cfg.table is not None and self.tables is not None and self.projection is None:
                if pos is None:
                    out[idx] = self.tables.prefill_many(np.full(len(idx), cfg.table), tok[idx])
                else:
                    for t in np.unique(tok[idx]):
                        sel = idx[tok[idx] == t]
                        out[sel] = self.tables.decode_steps(cfg.table, int(t), pos[sel])
            else:
                sub = {k: v[idx] for k, v in columns.items()}
                out[idx] = self.models[phase].predict(sub, len(idx), self._embeddings(sub, len(idx)))
        return out

    def _general(
        self, phase: Phase, config: Mapping[str, Any], text_tokens: int, text: str | None, positions: np.ndarray | None
    ) -> np.ndarray:
        """The booster on one request's rows (the prefill row, or one row per decode position)."""
        m = 1 if positions is None else len(positions)
        cols: dict[str, Any] = {a: np.repeat(np.asarray([config[a]]), m) for a in self.meta.axes}
        cols["text_tokens"] = np.full(m, text_tokens, dtype=np.int64)
        if positions is not None:
            cols["position"] = positions
        emb = None
        if self.projection is not None:
            if text is None:
                raise EstimatorError("the embedding variant needs the prompt text")
            emb = np.repeat(self.projection.transform(embed_texts([text])), m, axis=0)
        return self.models[phase].predict(cols, m, emb)

    def _embeddings(self, columns: Mapping[str, np.ndarray], n: int) -> np.ndarray | None:
        if self.projection is None:
            return None
        names = embedding_names(self.projection.dim)
        if all(c in columns for c in names):
            return np.column_stack([np.asarray(columns[c], dtype=np.float64) for c in names])
        if "text" not in columns:
            raise EstimatorError("the embedding variant needs the prompt `text` (or emb_00.. columns)")
        texts = [str(t) for t in columns["text"]]
        uniq = list(dict.fromkeys(texts))
        vecs = self.projection.transform(embed_texts(uniq))
        pos = {t: i for i, t in enumerate(uniq)}
        return vecs[[pos[t] for t in texts]]




def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _scalar_row(rows: Mapping[str, Any]) -> bool:
    return all(isinstance(v, int | float | str | np.generic) for v in rows.values())


__all__ = ["EMBEDDING_MODEL", "LatencyEstimator", "ModelMeta", "PhaseModel", "RequestBatch", "RequestPrediction"]
