"""The learners Experiment 2 crosses with the feature variants, and the physics-shaped reference.

- `lightgbm`: the product's model (`estimator.model.train.fit_phase_model`), log latency, trees.
- `ridge`: a linear model on the same features: per config (one-hot) an intercept and a slope on every length
  column (text_tokens, position and the variant's transforms of them), bucket indices one-hot and embedding
  dimensions additive; fitted on milliseconds by relative least squares (weights 1/y²), so `poly`'s tokens² can
  carry the quadratic cost of attention that a straight line cannot.
- `spline`: a GAM-like smooth model (scikit-learn SplineTransformer + Ridge) on log latency: per config an
  intercept and a cubic spline of each length column (linear beyond the training range).
- `physics`: prefill = a + b·n + c·n², decode = a + b·p, with a per config and the length terms b, c per model
  (shared by every config of the model, so they are fitted over the whole range of all of them); NNLS on relative
  error (`ClosedForm(group_column=...)`, estimator/model/closed_form.py). `physics_trees`: LightGBM on the log
  ratio to it (trees only correct the residual), which is what the product's `residual` variant now is.

For trees, `buckets` (step functions of text_tokens) and `poly` (monotone transforms of it) cannot change a split:
`BY_CONSTRUCTION` names those cells, and the evaluation checks that their predictions are identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from estimator.errors import EstimatorError
from estimator.model.closed_form import ClosedForm
from estimator.model.features import FeatureSpec, Phase, Variant, as_columns
from estimator.model.train import EmbeddingContext, fit_phase_model, lgbm_params, predict_frame

Learner = Literal["lightgbm", "ridge", "spline"]
LEARNERS: tuple[str, ...] = ("lightgbm", "ridge", "spline")
REFERENCE_MODELS: tuple[str, ...] = ("closed_form", "physics", "physics_trees", "random_forest")
BY_CONSTRUCTION = {("lightgbm", "buckets"), ("lightgbm", "poly")}
BY_CONSTRUCTION_NOTE = (
    "holds by construction: buckets are step functions and tokens**0.5 / tokens**2 monotone transforms of "
    "text_tokens, so none can change a tree's splits (on equal gain LightGBM keeps the earlier column)"
)
LENGTH_COLUMNS = (
    "text_tokens",
    "position",
    "text_tokens_sqrt",
    "text_tokens_sq",
    "position_sqrt",
    "position_sq",
    "block_index",
    "block_offset",
    "prompt_blocks",
)
BUCKET_COLUMNS = ("bucket_short", "bucket_log")
RIDGE_ALPHA = 1e-3
SPLINE_ALPHA = 1.0
SPLINE_KNOTS = 5
EMBEDDING_SHRINK = 0.1
CLIP_FACTOR = 10.0  # linear predictions are kept within [min / 10, max × 10] of the training latencies


def model_name(learner: str, variant: str) -> str:
    return f"{learner}:{variant}"


@dataclass
class FoldData:
    """What every learner of one fold and phase shares: axes, categories, the fitted closed form and physics
    form, and the embedding projection (when the embedding variant runs)."""

    phase: Phase
    axes: Sequence[str]
    categories: Mapping[str, Sequence[str]]
    config_columns: Sequence[str]
    closed: ClosedForm
    physics: ClosedForm  # the physics form: per-config a, length terms per model (closed_form.py)
    ctx: EmbeddingContext | None
    seed: int


class _Design:
    """Per-config intercepts and interactions with the length columns, plus additive extras, standardised."""

    def __init__(self, names: Sequence[str], n_axes: int, spline: bool) -> None:
        self.names = list(names)
        self.n_axes = n_axes
        self.spline = spline
        self.length_idx = [i for i, n in enumerate(names) if n in LENGTH_COLUMNS]
        self.bucket_idx = [i for i, n in enumerate(names) if n in BUCKET_COLUMNS]
        self.extra_idx = [i for i, n in enumerate(names) if n.startswith("emb_")]
        self.configs: dict[tuple[float, ...], int] = {}
        self.bucket_values: list[np.ndarray] = []
        self.mean = np.zeros(0)
        self.scale = np.ones(0)
        self.transformers: list[Any] = []

    def _config_index(self, x: np.ndarray) -> np.ndarray:
        keys = [tuple(r) for r in x[:, : self.n_axes]]
        return np.array([self.configs.get(k, -1) for k in keys])

    def fit(self, x: np.ndarray) -> _Design:
        for k in sorted({tuple(r) for r in x[:, : self.n_axes]}):
            self.configs[k] = len(self.configs)
        self.bucket_values = [np.unique(x[:, i]) for i in self.bucket_idx]
        lengths = x[:, self.length_idx]
        self.mean, self.scale = lengths.mean(axis=0), lengths.std(axis=0)
        self.scale[self.scale == 0] = 1.0
        if self.spline:
            from sklearn.preprocessing import SplineTransformer

            self.transformers = []
            for j in range(lengths.shape[1]):
                knots = int(min(SPLINE_KNOTS, max(2, len(np.unique(lengths[:, j])))))
                st = SplineTransformer(n_knots=knots, degree=3, extrapolation="linear", include_bias=False)
                self.transformers.append(st.fit(self._z(lengths)[:, [j]]))
        emb = x[:, self.extra_idx]
        self.emb_mean = emb.mean(axis=0) if emb.size else np.zeros(0)
        # One scale for all embedding dimensions (PCA dimensions of tiny variance are not blown up), and
        # EMBEDDING_SHRINK on top: they can outnumber the training rows, so they get a stronger penalty.
        self.emb_scale = float(emb.std()) / EMBEDDING_SHRINK if emb.size and emb.std() > 0 else 1.0
        return self

    def _z(self, lengths: np.ndarray) -> np.ndarray:
        return (lengths - self.mean) / self.scale

    def transform(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        cfg = self._config_index(x)
        onehot = np.zeros((n, len(self.configs)))
        seen = cfg >= 0
        onehot[np.flatnonzero(seen), cfg[seen]] = 1.0
        z = self._z(x[:, self.length_idx])
        splines = [t.transform(z[:, [j]]) for j, t in enumerate(self.transformers)]
        basis = np.hstack(splines) if self.spline else z
        inter = (onehot[:, :, None] * basis[:, None, :]).reshape(n, -1)
        parts = [onehot, inter]
        for i, values in zip(self.bucket_idx, self.bucket_values, strict=True):
            parts.append((x[:, [i]] == values[None, :]).astype(np.float64))
        if self.extra_idx:
            parts.append((x[:, self.extra_idx] - self.emb_mean) / self.emb_scale)
        return np.hstack(parts)


@dataclass
class LinearModel:
    """`ridge` or `spline` fitted on one variant's features; predicts ms."""

    spec: FeatureSpec
    design: _Design
    coef: Any
    log_target: bool
    residual_of: ClosedForm | None

    y_range: tuple[float, float]

    def predict(self, frame: pd.DataFrame, ctx: EmbeddingContext | None) -> np.ndarray:
        cols, n = as_columns(frame)
        x = self.spec.matrix(cols, n, _embeddings(self.spec, frame, ctx))
        out = self.coef.predict(self.design.transform(x))
        if self.residual_of is not None:
            pred = np.exp(np.clip(out, -20, 20)) * _positive(self.residual_of.predict(cols, n))
        elif self.log_target:
            pred = np.exp(np.clip(out, -20, 20))
        else:
            pred = out
        lo, hi = self.y_range
        return np.clip(pred, lo / CLIP_FACTOR, hi * CLIP_FACTOR)


def _positive(v: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(v, dtype=np.float64), 1e-6)


def _embeddings(spec: FeatureSpec, frame: pd.DataFrame, ctx: EmbeddingContext | None) -> np.ndarray | None:
    if spec.variant != "embedding":
        return None
    if ctx is None:
        raise EstimatorError("the embedding variant needs its projection")
    return ctx.rows(frame)


def fit_linear(frame: pd.DataFrame, variant: Variant, data: FoldData, spline: bool) -> LinearModel:
    """Fit `ridge` (spline=False) or `spline` on one phase's training rows."""
    from sklearn.linear_model import Ridge

    dim = data.ctx.projection.dim if data.ctx else 32
    spec = FeatureSpec(data.phase, variant, tuple(data.axes), {k: tuple(v) for k, v in data.categories.items()}, dim)
    cols, n = as_columns(frame)
    x = spec.matrix(cols, n, _embeddings(spec, frame, data.ctx))
    design = _Design(spec.names(), len(data.axes), spline).fit(x)
    d = design.transform(x)
    y = frame["latency_ms"].to_numpy(dtype=np.float64)
    residual = data.physics if variant == "residual" else None
    y_range = (float(y.min()), float(y.max()))
    alpha = SPLINE_ALPHA if spline else RIDGE_ALPHA
    if residual is not None:
        model = Ridge(alpha=alpha).fit(d, np.log(y / _positive(residual.predict(cols, n))))
        return LinearModel(spec, design, model, True, residual, y_range)
    if spline:
        model = Ridge(alpha=alpha).fit(d, np.log(y))
        return LinearModel(spec, design, model, True, None, y_range)
    model = Ridge(alpha=alpha).fit(d, y, sample_weight=1.0 / y**2)
    return LinearModel(spec, design, model, False, None, y_range)


# ---------------------------------------------------------------- the physics-shaped reference


@dataclass
class PhysicsTrees:
    """LightGBM on log(latency / physics form): the physics gives the shape, the trees only the residual."""

    physics: ClosedForm
    booster: Any
    spec: FeatureSpec

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        cols, n = as_columns(frame)
        return _positive(self.physics.predict(cols, n)) * np.exp(self.booster.predict(self.spec.matrix(cols, n)))


def fit_physics_trees(frame: pd.DataFrame, data: FoldData) -> PhysicsTrees:
    import lightgbm as lgb

    from estimator.model.train import NUM_ROUNDS

    spec = FeatureSpec(data.phase, "tokens", tuple(data.axes), {k: tuple(v) for k, v in data.categories.items()})
    cols, n = as_columns(frame)
    target = np.log(frame["latency_ms"].to_numpy(dtype=np.float64) / _positive(data.physics.predict(cols, n)))
    ds = lgb.Dataset(spec.matrix(cols, n), label=target, feature_name=spec.names(), params={"verbose": -1})
    booster = lgb.train(lgbm_params(n, data.seed), ds, num_boost_round=NUM_ROUNDS)
    return PhysicsTrees(data.physics, booster, spec)


# ---------------------------------------------------------------- one fit, one prediction


def fit_predict(
    learner: str, variant: str, train: pd.DataFrame, test: pd.DataFrame, data: FoldData
) -> np.ndarray:
    """Fit `learner` (or a reference model, with variant "-") on `train` and predict `test` (ms)."""
    if learner == "lightgbm":
        model = fit_phase_model(
            train, data.phase, variant, data.axes, data.categories, data.seed, data.physics, data.ctx  # type: ignore[arg-type]
        )
        return predict_frame(model, test, data.ctx)
    if learner in ("ridge", "spline"):
        return fit_linear(train, variant, data, spline=learner == "spline").predict(test, data.ctx)  # type: ignore[arg-type]
    if learner == "closed_form":
        cols, n = as_columns(test)
        return _positive(data.closed.predict(cols, n))
    if learner == "physics":
        cols, n = as_columns(test)
        return _positive(data.physics.predict(cols, n))
    if learner == "physics_trees":
        return fit_physics_trees(train, data).predict(test)
    if learner == "random_forest":
        from estimator.study.references import fit_random_forest

        spec = FeatureSpec(data.phase, "tokens", tuple(data.axes), {k: tuple(v) for k, v in data.categories.items()})
        tr_cols, tr_n = as_columns(train)
        te_cols, te_n = as_columns(test)
        forest = fit_random_forest(spec.matrix(tr_cols, tr_n), train["latency_ms"].to_numpy(), data.seed)
        return np.asarray(forest.predict(spec.matrix(te_cols, te_n)))
    raise EstimatorError(f"unknown learner {learner!r}")
