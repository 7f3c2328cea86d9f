"""The general prediction path: LightGBM's booster per phase (`PhaseModel`), parsed on first use, and one
request's rows through it. The compiled tables (estimator/model/tables.py) answer every trained config without it;
the booster answers the embedding variant and configs the tables do not hold."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from estimator.errors import EstimatorError
from estimator.model.closed_form import ClosedForm
from estimator.model.embedding import Projection, embed_texts
from estimator.model.features import FeatureSpec, Phase, embedding_names
from estimator.model.tables import FLOOR_MS

if TYPE_CHECKING:
    import lightgbm as lgb


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
            self._booster = read_booster(self.model_path, self.spec.names())
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


def read_booster(path: Path | None, features: list[str]) -> lgb.Booster:
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


def request_rows(
    models: Mapping[Phase, PhaseModel],
    axes: list[str],
    projection: Projection | None,
    phase: Phase,
    config: Mapping[str, Any],
    text_tokens: int,
    text: str | None,
    positions: np.ndarray | None,
) -> np.ndarray:
    """The booster on one request's rows (the prefill row, or one row per decode position), ms."""
    m = 1 if positions is None else len(positions)
    cols: dict[str, Any] = {a: np.repeat(np.asarray([config[a]]), m) for a in axes}
    cols["text_tokens"] = np.full(m, text_tokens, dtype=np.int64)
    if positions is not None:
        cols["position"] = positions
    emb = None
    if projection is not None:
        if text is None:
            raise EstimatorError("the embedding variant needs the prompt text")
        emb = np.repeat(projection.transform(embed_texts([text])), m, axis=0)
    return models[phase].predict(cols, m, emb)


def embeddings_of(projection: Projection | None, columns: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The projected embeddings of rows: their `emb_..` columns, or their `text` embedded (each distinct once)."""
    if projection is None:
        return None
    names = embedding_names(projection.dim)
    if all(c in columns for c in names):
        return np.column_stack([np.asarray(columns[c], dtype=np.float64) for c in names])
    if "text" not in columns:
        raise EstimatorError("the embedding variant needs the prompt `text` (or emb_00.. columns)")
    texts = [str(t) for t in columns["text"]]
    uniq = list(dict.fromkeys(texts))
    vecs = projection.transform(embed_texts(uniq))
    pos = {t: i for i, t in enumerate(uniq)}
    return vecs[[pos[t] for t in texts]]
