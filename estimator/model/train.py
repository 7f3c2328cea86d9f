"""Fit the per-phase LightGBM models of one feature variant and save them as a LatencyEstimator."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
from pydantic import Field

from estimator.data.runs import PHASES, SCHEMA_VERSION, RunSet, RunsSpec, load_runs
from estimator.errors import EstimatorError
from estimator.model.closed_form import ClosedForm, model_group
from estimator.model.embedding import (
    CHUNK_WORDS,
    EMBEDDING_MODEL,
    MAX_CHUNKS,
    EmbeddingCache,
    Projection,
    prompt_vectors,
)
from estimator.model.estimator import LatencyEstimator, PhaseModel, baseline_ms
from estimator.model.evaluation import error_metrics, split_by_prompt
from estimator.model.features import (
    PCA_DIM,
    FeatureSpec,
    Phase,
    Variant,
    as_columns,
    axis_categories,
    feature_axes,
)
from estimator.model.meta import (
    FORMAT_VERSION,
    ClosedFormMeta,
    EmbeddingMeta,
    HeldOut,
    ModelMeta,
    PcaMeta,
    PhaseMeta,
    RunSummary,
    TrainingSummary,
    axis_ranges,
    finite_or_none,
)
from estimator.model.tables import TABLE_VARIANTS

# LightGBM fits log(latency_ms) with L2 loss, so errors are relative (what MAPE measures) at every scale.
LGBM_PARAMS: dict[str, Any] = {
    "objective": "regression",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 20,
    "lambda_l2": 1.0,
    "num_threads": 1,  # two OpenMP threads were 2-7x slower on these small data sets (2-core machine)
    "deterministic": True,
    "force_col_wise": True,
    "verbose": -1,
}
NUM_ROUNDS = 300
DEFAULT_MAX_DECODE_ROWS = 20_000


class TrainSpec(RunsSpec):
    """What `estimate train` does: which runs, which feature variant, where the model goes."""

    variant: Variant = "tokens"
    out: Path
    seed: int = 0
    max_decode_rows: int = Field(default=DEFAULT_MAX_DECODE_ROWS, ge=100)
    test_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    held_out: bool = True
    numeric_axes: list[str] = Field(
        default_factory=list, description="config axes that may be interpolated inside their trained range"
    )


@dataclass(frozen=True)
class TrainResult:
    """Where the model went, what it scored on held-out prompts, and how long fitting took (s)."""

    path: Path
    meta: ModelMeta
    train_s: float


def tool_version() -> str:
    try:
        return metadata.version("llm-latency-profiler")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def subsample(frame: pd.DataFrame, max_rows: int, seed: int = 0) -> pd.DataFrame:
    """At most `max_rows` rows, drawn uniformly with a fixed seed (order kept)."""
    if len(frame) <= max_rows:
        return frame
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(frame), size=max_rows, replace=False))
    return frame.iloc[keep].reset_index(drop=True)


def lgbm_params(n_rows: int, seed: int) -> dict[str, Any]:
    """LightGBM parameters; small data gets smaller leaves so the trees can still split."""
    params = dict(LGBM_PARAMS, seed=seed)
    params["min_data_in_leaf"] = int(max(2, min(LGBM_PARAMS["min_data_in_leaf"], n_rows // 20)))
    return params


@dataclass
class EmbeddingContext:
    """Cached 384-d prompt embeddings and the PCA fitted on training prompts."""

    cache: EmbeddingCache
    projection: Projection

    @classmethod
    def fit(cls, frames: Sequence[pd.DataFrame], cache: EmbeddingCache, dim: int = PCA_DIM) -> EmbeddingContext:
        """Fit the PCA on the distinct prompts of the training frames (one vector per prompt)."""
        both = pd.concat([f[["prompt_id", "text"]] for f in frames]).drop_duplicates("prompt_id")
        vecs = cache.get(both["prompt_id"].astype(str).tolist(), both["text"].astype(str).tolist())
        return cls(cache=cache, projection=Projection.fit(vecs, dim))

    def rows(self, frame: pd.DataFrame) -> np.ndarray:
        """Projected embeddings (n × dim) for the rows of `frame`."""
        return self.projection.transform(prompt_vectors(frame["prompt_id"], frame["text"], self.cache))


def fit_phase_model(
    frame: pd.DataFrame,
    phase: Phase,
    variant: Variant,
    axes: Sequence[str],
    categories: Mapping[str, Sequence[str]],
    seed: int = 0,
    closed_form: ClosedForm | None = None,
    embeddings: EmbeddingContext | None = None,
) -> PhaseModel:
    """Fit one phase's LightGBM model on `frame` (rows of that phase)."""
    if len(frame) < 2:
        raise EstimatorError(f"too few {phase} rows to train on: {len(frame)}")
    dim = embeddings.projection.dim if embeddings else PCA_DIM
    spec = FeatureSpec(phase, variant, tuple(axes), {k: tuple(v) for k, v in categories.items()}, dim)
    columns, n = as_columns(frame)
    emb = embeddings.rows(frame) if variant == "embedding" and embeddings else None
    x = spec.matrix(columns, n, emb)
    y = frame["latency_ms"].to_numpy(dtype=np.float64)
    target = np.log(y)
    if variant == "residual":
        if closed_form is None:
            raise EstimatorError("the residual variant needs a fitted closed form")
        target = target - np.log(baseline_ms(closed_form, columns, n))
    params = lgbm_params(n, seed)
    data = lgb.Dataset(x, label=target, feature_name=spec.names(), free_raw_data=True, params={"verbose": -1})
    booster = lgb.train(params, data, num_boost_round=NUM_ROUNDS)
    return PhaseModel(spec=spec, booster=booster, closed_form=closed_form if variant == "residual" else None)


def prepare_frames(runset: RunSet, variant: Variant) -> dict[Phase, pd.DataFrame]:
    """Rows per phase, with the prompt text joined when the variant needs it."""
    out: dict[Phase, pd.DataFrame] = {}
    for phase in PHASES:
        frame = runset.phase(phase)
        if frame.empty:
            raise EstimatorError(f"no {phase} samples in the given runs")
        out[phase] = runset.with_text(frame) if variant == "embedding" else frame
    return out


def fit_all(
    frames: Mapping[Phase, pd.DataFrame],
    variant: Variant,
    axes: Sequence[str],
    categories: Mapping[str, Sequence[str]],
    config_columns: Sequence[str],
    seed: int,
    cache: EmbeddingCache | None,
) -> tuple[dict[Phase, PhaseModel], dict[Phase, ClosedForm], EmbeddingContext | None]:
    """Closed forms, the embedding PCA (if needed) and both phase models, fitted on `frames`."""
    group = model_group(axes)  # the physics form: per-config fixed cost, length terms per model
    closed = {p: ClosedForm(p, axes, config_columns, group_column=group).fit(frames[p]) for p in frames}
    ctx = None
    if variant == "embedding":
        ctx = EmbeddingContext.fit(list(frames.values()), cache or EmbeddingCache())
    models = {p: fit_phase_model(frames[p], p, variant, axes, categories, seed, closed[p], ctx) for p in frames}
    return models, closed, ctx


def predict_frame(model: PhaseModel, frame: pd.DataFrame, ctx: EmbeddingContext | None) -> np.ndarray:
    """Predictions (ms) for the rows of a frame."""
    columns, n = as_columns(frame)
    emb = ctx.rows(frame) if model.spec.variant == "embedding" and ctx else None
    return model.predict(columns, n, emb)


def training_summary(
    runset: RunSet, frames: Mapping[Phase, pd.DataFrame], used: Mapping[Phase, int]
) -> TrainingSummary:
    """What the model saw: runs, rows, prompt and position ranges, configs, latency scale."""
    pre, dec = frames["prefill"], frames["decode"]
    allrows = pd.concat([pre, dec])
    configs = allrows[runset.config_columns].drop_duplicates().sort_values(runset.config_columns).to_dict("records")
    configs = [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in c.items()} for c in configs]
    latency: dict[str, dict[str, float]] = {
        p: {
            "min": float(f["latency_ms"].min()),
            "median": float(f["latency_ms"].median()),
            "max": float(f["latency_ms"].max()),
        }
        for p, f in frames.items()
    }
    return TrainingSummary(
        runs=[
            RunSummary(
                run_id=r.run_id,
                path=str(r.path),
                status=r.status,
                device=_device_name(r.manifest),
            )
            for r in runset.runs
        ],
        rows={p: int(v) for p, v in used.items()},
        rows_available={p: len(f) for p, f in frames.items()},
        prompts=int(allrows["prompt_id"].nunique()),
        text_tokens_min=int(allrows["text_tokens"].min()),
        text_tokens_max=int(allrows["text_tokens"].max()),
        position_min=int(dec["position"].min()),
        position_max=int(dec["position"].max()),
        decode_steps_max=int(dec["step_index"].max()),
        configs=configs,
        latency_ms=latency,
    )


def _device_name(manifest: Mapping[str, Any]) -> str | None:
    env = manifest.get("environment")
    dev = env.get("device") if isinstance(env, dict) else None
    if isinstance(dev, dict):
        return str(dev.get("name") or dev.get("cpu_model") or dev) or None
    return str(dev) if dev is not None else None


def train_estimator(
    runset: RunSet,
    variant: Variant = "tokens",
    seed: int = 0,
    max_decode_rows: int = DEFAULT_MAX_DECODE_ROWS,
    test_fraction: float = 0.25,
    held_out: bool = True,
    cache: EmbeddingCache | None = None,
    numeric_axes: Sequence[str] = (),
) -> LatencyEstimator:
    """Fit a LatencyEstimator on all rows (decode subsampled), with metrics from a by-prompt held-out fit."""
    frames = prepare_frames(runset, variant)
    axes = feature_axes(runset.axes)
    categories = axis_categories(runset.samples, axes)
    cache = cache or EmbeddingCache()
    held: HeldOut | None = None
    if held_out:
        metrics: dict[str, dict[str, float | None]] = {}
        split = {p: split_by_prompt(frames[p], test_fraction, seed) for p in frames}
        train_frames = {p: frames[p].iloc[split[p].train].reset_index(drop=True) for p in frames}
        train_frames["decode"] = subsample(train_frames["decode"], max_decode_rows, seed)
        models, _, ctx = fit_all(train_frames, variant, axes, categories, runset.config_columns, seed, cache)
        for p in frames:
            test = frames[p].iloc[split[p].test].reset_index(drop=True)
            pred = predict_frame(models[p], test, ctx)
            metrics[p] = {k: finite_or_none(v) for k, v in error_metrics(test["latency_ms"].to_numpy(), pred).items()}
        held = HeldOut(split="by_prompt", description=split["prefill"].description, metrics=metrics)
    fit_frames = dict(frames)
    fit_frames["decode"] = subsample(frames["decode"], max_decode_rows, seed)
    models, closed, ctx = fit_all(fit_frames, variant, axes, categories, runset.config_columns, seed, cache)
    embedding_meta = None
    if ctx is not None:
        embedding_meta = EmbeddingMeta(
            model=EMBEDDING_MODEL,
            chunk_words=CHUNK_WORDS,
            max_chunks=MAX_CHUNKS,
            pca=PcaMeta(**ctx.projection.to_dict()),
        )
    meta = ModelMeta(
        format_version=FORMAT_VERSION,
        schema_version=SCHEMA_VERSION,
        tool_version=tool_version(),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        variant=variant,
        axes=list(axes),
        config_columns=list(runset.config_columns),
        categories={k: list(v) for k, v in categories.items()},
        phases={
            p: PhaseMeta(
                features=models[p].spec.names(),
                model_file=f"{p}.txt",
                target=models[p].target,
                num_trees=models[p].booster.num_trees(),
            )
            for p in models
        },
        training=training_summary(runset, frames, {p: len(f) for p, f in fit_frames.items()}),
        held_out=held,
        closed_form=ClosedFormMeta(
            prefill=closed["prefill"].to_records(),
            decode=closed["decode"].to_records(),
            pooled_prefill=closed["prefill"].pooled_record(),
            pooled_decode=closed["decode"].pooled_record(),
        ),
        embedding=embedding_meta,
        lightgbm_params=dict(LGBM_PARAMS, num_boost_round=NUM_ROUNDS, seed=seed),
        request_prediction=(
            "compiled tables (tables.npz): prefill and per-step decode values per trained config between the "
            "trees' split thresholds, decode prefix sums over position; exact (the booster's own outputs)"
            if variant in TABLE_VARIANTS
            else "booster per request: prefill row + one decode row per step (exact sum)"
        ),
    )
    unknown = sorted(set(numeric_axes) - set(runset.config_columns))
    if unknown:
        known = ", ".join(runset.config_columns)
        raise EstimatorError(f"--numeric-axis {', '.join(unknown)}: not an axis of these runs ({known})")
    meta.axis_ranges = axis_ranges(meta.training.configs, runset.config_columns, numeric_axes)
    return LatencyEstimator(meta, models, ctx.projection if ctx else None)


def train(spec: TrainSpec) -> TrainResult:
    """Load the runs, fit the estimator, save it into `spec.out`."""
    t0 = time.perf_counter()
    runset = load_runs(spec.runs)
    est = train_estimator(
        runset,
        spec.variant,
        seed=spec.seed,
        max_decode_rows=spec.max_decode_rows,
        test_fraction=spec.test_fraction,
        held_out=spec.held_out,
        numeric_axes=spec.numeric_axes,
    )
    elapsed = time.perf_counter() - t0
    path = est.save(spec.out)
    return TrainResult(path=path, meta=est.meta, train_s=elapsed)
