"""The trained latency estimator (`LatencyEstimator`): one LightGBM model per phase, saved without pickle.

Layout of `models/<name>/`: `prefill.txt` and `decode.txt` (LightGBM text models) and `meta.json` (`ModelMeta`,
see `estimator.model.meta`). This module is what a scheduler imports: no study, report, matplotlib or sklearn.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightgbm as lgb
import numpy as np
import pandas as pd
from pydantic import ValidationError

from estimator.data.runs import PHASES, SCHEMA_VERSION
from estimator.errors import EstimatorError, one_line_validation_error
from estimator.model.closed_form import ClosedForm
from estimator.model.embedding import CHUNK_WORDS, EMBEDDING_MODEL, MAX_CHUNKS, Projection, embed_texts
from estimator.model.features import (
    PCA_DIM,
    FeatureSpec,
    Phase,
    as_columns,
    config_key,
    embedding_names,
    key_part,
)
from estimator.model.meta import FORMAT_VERSION, ModelMeta, closed_form_from_meta, sha256_of

PHASE_NAMES: tuple[Phase, ...] = PHASES
# predict_request evaluates the decode model at no more than this many positions per call (one LightGBM
# row costs ~10 µs here); 32 kept the sum within 0.1% of the per-step sum on the synthetic tests.
REQUEST_KNOTS = 32
# predict_request remembers this many recent answers (a scheduler asks the same questions again).
REQUEST_CACHE_SIZE = 4096
_MIN_PRED_MS = 1e-3


@dataclass
class PhaseModel:
    """One phase's booster with its feature spec; the residual variant multiplies a closed-form baseline."""

    spec: FeatureSpec
    booster: lgb.Booster
    closed_form: ClosedForm | None = None

    @property
    def target(self) -> Literal["log_latency_ms", "log_ratio_to_closed_form"]:
        return "log_ratio_to_closed_form" if self.spec.variant == "residual" else "log_latency_ms"

    def predict(
        self, columns: Mapping[str, np.ndarray], n: int, embeddings: np.ndarray | None = None
    ) -> np.ndarray:
        """Latency (ms) per row from raw columns (and projected embeddings for the embedding variant)."""
        x = self.spec.matrix(columns, n, embeddings)
        raw = self.booster.predict(x, num_threads=1)
        out = np.exp(np.asarray(raw, dtype=np.float64))
        if self.spec.variant == "residual":
            if self.closed_form is None:
                raise EstimatorError("residual model without its closed form")
            out = out * baseline_ms(self.closed_form, columns, n)
        return out


def baseline_ms(closed_form: ClosedForm, columns: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """Closed-form baseline (ms, floored at 1 µs) that the residual variant's trees multiply."""
    return np.maximum(closed_form.predict(columns, n), _MIN_PRED_MS)


@dataclass(frozen=True)
class RequestPrediction:
    """Predicted latency of one request: the prefill step plus `decode_steps` decode steps (ms)."""

    prefill_ms: float
    decode_ms_total: float
    total_ms: float
    decode_steps: int
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "prefill_ms": self.prefill_ms,
            "decode_ms_total": self.decode_ms_total,
            "total_ms": self.total_ms,
            "decode_steps": self.decode_steps,
            "warnings": list(self.warnings),
        }


def request_knots(steps: int, max_knots: int | None = None) -> np.ndarray:
    """Decode step indices (1..steps) at which predict_request evaluates the model.

    All steps when there are at most `max_knots`; otherwise a log-spaced set (dense near the prompt, where
    the training data is) merged with an even set, always including the first and last step.
    """
    max_knots = max_knots or REQUEST_KNOTS
    if steps <= 0:
        return np.zeros(0, dtype=np.int64)
    if steps <= max_knots:
        return np.arange(1, steps + 1, dtype=np.int64)
    half = max_knots // 2
    geo = np.unique(np.round(np.geomspace(1, steps, half)).astype(np.int64))
    lin = np.round(np.linspace(1, steps, max_knots - len(geo))).astype(np.int64)
    return np.unique(np.concatenate([geo, lin, [1, steps]]))


def interpolated_sum(knots: np.ndarray, values: np.ndarray) -> float:
    """Sum over every integer i in [knots[0], knots[-1]] of the piecewise-linear interpolant of values."""
    if len(knots) == 0:
        return 0.0
    x = knots.astype(np.float64)
    y = np.asarray(values, dtype=np.float64)
    seg = np.diff(x)
    total = np.sum(seg * y[:-1] + (y[1:] - y[:-1]) * (seg - 1.0) / 2.0) + y[-1]
    return float(total)


class LatencyEstimator:
    """Predicts prefill latency and per-position decode latency (ms) for a serving config.

    Load with `LatencyEstimator.load(path)`; a scheduler needs nothing else from this package.
    """

    def __init__(
        self,
        meta: ModelMeta,
        models: Mapping[Phase, PhaseModel],
        projection: Projection | None = None,
    ) -> None:
        self.meta = meta
        self.models = dict(models)
        self.projection = projection
        self._request_cache: OrderedDict[tuple[Any, ...], RequestPrediction] = OrderedDict()

    # -------------------------------------------------------------- save / load

    def save(self, path: Path | str) -> Path:
        """Write `prefill.txt`, `decode.txt` and `meta.json` into the folder `path` (created)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        for phase, model in self.models.items():
            # tmp + rename, and the digest in meta.json: a kill mid-save never leaves a model that loads half
            target = folder / self.meta.phases[phase].model_file
            tmp_model = target.with_name(target.name + ".tmp")
            model.booster.save_model(str(tmp_model))
            self.meta.phases[phase].sha256 = sha256_of(tmp_model)
            os.replace(tmp_model, target)
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
        if meta.format_version != FORMAT_VERSION:
            raise EstimatorError(
                f"{meta_path}: model format_version {meta.format_version} (expected {FORMAT_VERSION})"
            )
        if meta.schema_version != SCHEMA_VERSION:
            raise EstimatorError(
                f"{meta_path}: trained on results schema_version {meta.schema_version}, "
                f"this estimator reads {SCHEMA_VERSION}"
            )
        if set(meta.phases) != set(PHASE_NAMES):
            raise EstimatorError(
                f"{meta_path}: metadata must describe both phases, has {sorted(meta.phases)}"
            )
        if (meta.variant == "embedding") != (meta.embedding is not None):
            raise EstimatorError(f"{meta_path}: variant {meta.variant!r} and embedding metadata disagree")
        if meta.embedding and (meta.embedding.chunk_words, meta.embedding.max_chunks) != (
            CHUNK_WORDS,
            MAX_CHUNKS,
        ):
            raise EstimatorError(
                f"{meta_path}: embeddings were chunked as {meta.embedding.chunk_words} words × "
                f"{meta.embedding.max_chunks}, this estimator uses {CHUNK_WORDS} × {MAX_CHUNKS}"
            )
        projection = Projection.from_dict(meta.embedding.pca.model_dump()) if meta.embedding else None
        dim = projection.dim if projection else PCA_DIM
        models: dict[Phase, PhaseModel] = {}
        for phase in PHASE_NAMES:
            pm = meta.phases[phase]
            spec = FeatureSpec(phase, meta.variant, tuple(meta.axes), meta.categories, dim)
            if spec.names() != pm.features:
                raise EstimatorError(
                    f"{meta_path}: {phase} feature list {pm.features} does not match "
                    f"variant {meta.variant!r} "
                    f"with axes {meta.axes}"
                )
            model_path = folder / pm.model_file
            if not model_path.is_file() or Path(pm.model_file).name != pm.model_file:
                raise EstimatorError(f"{folder}: missing model file {pm.model_file!r}")
            if pm.sha256 is not None and sha256_of(model_path) != pm.sha256:
                raise EstimatorError(f"{model_path}: content does not match meta.json (truncated or edited model file)")
            try:
                booster = lgb.Booster(model_file=str(model_path))
            except lgb.basic.LightGBMError as exc:
                raise EstimatorError(f"{model_path}: unreadable LightGBM model ({exc})") from exc
            if booster.feature_name() != pm.features:
                raise EstimatorError(
                    f"{model_path}: model features {booster.feature_name()} differ "
                    f"from those in meta.json {pm.features}"
                )
            cf = None
            if meta.variant == "residual":
                cf = closed_form_from_meta(meta, phase)
            models[phase] = PhaseModel(spec=spec, booster=booster, closed_form=cf)
        return cls(meta, models, projection)

    # -------------------------------------------------------------- predictions

    @property
    def variant(self) -> str:
        return self.meta.variant

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

    def _predict(self, phase: Phase, rows: Mapping[str, Any] | pd.DataFrame) -> np.ndarray:
        columns, n = as_columns(rows)
        if n == 0:
            return np.zeros(0)
        _check_values(phase, columns)
        return self.models[phase].predict(columns, n, self._embeddings(columns, n))

    def predict_prefill(self, rows: Mapping[str, Any] | pd.DataFrame) -> np.ndarray:
        """Prefill latency (ms) per row: config axes + `text_tokens` (+ `text` for the embedding variant)."""
        return self._predict("prefill", rows)

    def predict_decode(self, rows: Mapping[str, Any] | pd.DataFrame) -> np.ndarray:
        """Decode-step latency (ms) per row: config axes + `text_tokens` + `position` (+ `text`)."""
        return self._predict("decode", rows)

    def decode_positions(
        self, config: Mapping[str, Any], text_tokens: int, new_tokens: int, text: str | None = None
    ) -> np.ndarray:
        """Exact per-step decode latencies (ms) of a request, steps 1..new_tokens-1 (one row per step)."""
        steps = np.arange(1, max(new_tokens, 1), dtype=np.int64)
        cols = self._request_columns(self.complete_config(config), text_tokens, text, text_tokens + steps)
        return self.predict_decode(cols) if len(steps) else np.zeros(0)

    def _request_columns(
        self, config: Mapping[str, Any], text_tokens: int, text: str | None, positions: np.ndarray
    ) -> dict[str, Any]:
        cols: dict[str, Any] = {
            a: np.repeat(np.asarray([config[a]]), len(positions)) for a in self._needed(config)
        }
        cols["text_tokens"] = np.full(len(positions), text_tokens, dtype=np.int64)
        cols["position"] = positions
        if self.projection is not None:
            if text is None:
                raise EstimatorError("the embedding variant needs the prompt text")
            emb = self.projection.transform(embed_texts([text]))[0]
            for name, v in zip(embedding_names(self.projection.dim), emb, strict=True):
                cols[name] = np.full(len(positions), v)
        return cols

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

    def _needed(self, config: Mapping[str, Any]) -> list[str]:
        needed = list(self.meta.axes)
        missing = [a for a in needed if a not in config]
        if missing:
            raise EstimatorError(f"config lacks axis value(s) for {', '.join(missing)}")
        return needed

    def check_request(self, config: Mapping[str, Any], text_tokens: int, new_tokens: int) -> list[str]:
        """Warnings for a request outside the trained range; EstimatorError for impossible values."""
        if int(text_tokens) <= 0:
            raise EstimatorError(f"text_tokens must be > 0, got {text_tokens}")
        if int(new_tokens) < 1:
            raise EstimatorError(f"new_tokens must be >= 1, got {new_tokens}")
        self._needed(config)
        t = self.meta.training
        notes = []
        if not t.text_tokens_min <= text_tokens <= t.text_tokens_max:
            notes.append(
                f"text_tokens {text_tokens} is outside the trained range "
                f"{t.text_tokens_min}..{t.text_tokens_max}"
            )
        last = text_tokens + new_tokens - 1
        if new_tokens > 1 and last > t.position_max:
            notes.append(f"last decode position {last} beyond the trained maximum {t.position_max}")
        if new_tokens - 1 > t.decode_steps_max:
            notes.append(
                f"{new_tokens - 1} decode steps, trained on at most {t.decode_steps_max} per request"
            )
        cols = [c for c in self.meta.config_columns if c in config]
        unseen_axis = False
        for c in cols:
            values = sorted({key_part(tc[c]) for tc in t.configs if c in tc})
            if values and key_part(config[c]) not in values:
                unseen_axis = True
                notes.append(f"{c}={config[c]} is not among the trained values [{', '.join(values)}]")
        if not unseen_axis and config_key(config, cols) not in {config_key(tc, cols) for tc in t.configs}:
            notes.append(f"config {dict((c, config[c]) for c in cols)} was not seen in training")
        return notes

    def predict_request(
        self,
        config: Mapping[str, Any],
        text_tokens: int,
        new_tokens: int,
        text: str | None = None,
        warn: bool = False,
        cache: bool = True,
    ) -> RequestPrediction:
        """Whole-request latency (ms): prefill + the `new_tokens - 1` decode steps that follow it.

        Costs two batched model calls whatever `new_tokens` is: the decode model is evaluated at most at
        REQUEST_KNOTS step indices (`request_knots`) and the sum over all steps is the exact sum of the
        piecewise-linear interpolant between them. With new_tokens - 1 <= REQUEST_KNOTS every step is
        evaluated and the sum is exact; beyond that it differed from summing per-step predictions by < 0.1%
        on synthetic runs (the tests hold it to 1%): the decode curve is smooth in position. Answers are
        memoised (REQUEST_CACHE_SIZE most recent; `cache=False` recomputes), so a repeated question costs a
        dict lookup.
        """
        key = (
            tuple(sorted((str(k), key_part(v)) for k, v in config.items())),
            int(text_tokens),
            int(new_tokens),
            text,
        )
        cached = self._request_cache.get(key) if cache else None
        if cached is None:
            cached = self._predict_request(config, int(text_tokens), int(new_tokens), text)
            self._request_cache[key] = cached
            if len(self._request_cache) > REQUEST_CACHE_SIZE:
                self._request_cache.popitem(last=False)
        if warn:
            for note in cached.warnings:
                warnings.warn(note, stacklevel=2)
        return cached

    def _predict_request(
        self, config: Mapping[str, Any], text_tokens: int, new_tokens: int, text: str | None
    ) -> RequestPrediction:
        config = self.complete_config(config)
        notes = self.check_request(config, int(text_tokens), int(new_tokens))
        steps = int(new_tokens) - 1
        knots = request_knots(steps)
        cols = self._request_columns(
            config, int(text_tokens), text, np.concatenate([[text_tokens], text_tokens + knots])
        )
        columns, n = as_columns(cols)
        emb = self._embeddings(columns, n)
        prefill = float(
            self.models["prefill"].predict(_take(columns, slice(0, 1)), 1, _rows(emb, slice(0, 1)))[0]
        )
        decode_total = 0.0
        if steps > 0:
            sel = slice(1, n)
            values = self.models["decode"].predict(_take(columns, sel), n - 1, _rows(emb, sel))
            decode_total = interpolated_sum(knots, values)
        return RequestPrediction(
            prefill_ms=prefill,
            decode_ms_total=decode_total,
            total_ms=prefill + decode_total,
            decode_steps=max(steps, 0),
            warnings=tuple(notes),
        )



def _take(columns: Mapping[str, np.ndarray], sel: slice) -> dict[str, np.ndarray]:
    return {k: v[sel] for k, v in columns.items()}


def _rows(emb: np.ndarray | None, sel: slice) -> np.ndarray | None:
    return None if emb is None else emb[sel]


def _check_values(phase: Phase, columns: Mapping[str, np.ndarray]) -> None:
    """Impossible inputs are errors: text_tokens <= 0, decode position <= text_tokens."""
    if "text_tokens" in columns:
        tok = np.asarray(columns["text_tokens"], dtype=np.float64)
        if np.any(~np.isfinite(tok)) or np.any(tok <= 0):
            raise EstimatorError("text_tokens must be a positive number of tokens")
        if phase == "decode" and "position" in columns:
            pos = np.asarray(columns["position"], dtype=np.float64)
            if np.any(~np.isfinite(pos)) or np.any(pos <= tok):
                raise EstimatorError(
                    "decode position must be greater than text_tokens (position = text_tokens + i)"
                )


__all__ = [
    "EMBEDDING_MODEL",
    "LatencyEstimator",
    "ModelMeta",
    "PhaseModel",
    "RequestPrediction",
]
