"""`meta.json` of a saved model (`ModelMeta`, validated on load: unknown keys are an error) and its helpers.

Layout of `models/<name>/`: `prefill.txt` and `decode.txt` (LightGBM text models) and `meta.json`: feature
lists, variant, results schema version, training-data summary, held-out metrics, closed-form coefficients per
config, the embedding PCA as plain arrays for the embedding variant, and a sha256 per model file.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from estimator.data.runs import PHASES, SCHEMA_VERSIONS
from estimator.errors import EstimatorError
from estimator.model.closed_form import ClosedForm
from estimator.model.embedding import CHUNK_WORDS, MAX_CHUNKS
from estimator.model.features import Phase, Variant, key_part
from estimator.model.tables import TABLES_VERSION
from estimator.strict import StrictModel

FORMAT_VERSION = 1


class RunSummary(StrictModel):
    run_id: str
    path: str
    status: str
    device: str | None = None


class TrainingSummary(StrictModel):
    """What the model was trained on (ranges are inclusive)."""

    runs: list[RunSummary]
    rows: dict[str, int]
    rows_available: dict[str, int]
    prompts: int
    text_tokens_min: int
    text_tokens_max: int
    position_min: int
    position_max: int
    decode_steps_max: int
    configs: list[dict[str, Any]]
    latency_ms: dict[str, dict[str, float]]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class PhaseMeta(StrictModel):
    features: list[str]
    model_file: str
    target: Literal["log_latency_ms", "log_ratio_to_closed_form"]
    num_trees: int
    sha256: str | None = None  # of model_file; checked before LightGBM parses it (its parser aborts on bad input)


class HeldOut(StrictModel):
    split: str
    description: str
    metrics: dict[str, dict[str, float | None]]


class ClosedFormMeta(StrictModel):
    """Per-config least-squares coefficients (prefill a + b·n + c·n², decode a + b·p) and pooled fallbacks."""

    prefill: list[dict[str, Any]]
    decode: list[dict[str, Any]]
    pooled_prefill: list[float]
    pooled_decode: list[float]


class PcaMeta(StrictModel):
    input_dim: int
    output_dim: int
    n_fit_prompts: int
    mean: list[float]
    components: list[list[float]]
    explained_variance_ratio: list[float]


class EmbeddingMeta(StrictModel):
    model: str
    chunk_words: int
    max_chunks: int
    pca: PcaMeta


class TablesMeta(StrictModel):
    """The compiled lookup tables (`estimator.model.tables`), saved beside the LightGBM models."""

    file: str
    version: int
    sha256: str
    configs: int
    bytes: int


class AxisRange(StrictModel):
    """What a config axis's trained values mean: `categorical` (only these values) or `numeric` (anything in
    [min, max] may be interpolated)."""

    kind: Literal["categorical", "numeric"]
    values: list[str]
    min: float | None = None
    max: float | None = None

    def span(self) -> str:
        """`min..max` as the config keys write numbers (`?` for a missing end)."""
        return "..".join("?" if v is None else key_part(v) for v in (self.min, self.max))


class ModelMeta(StrictModel):
    """Contents of meta.json; validated on load (unknown keys are an error)."""

    format_version: int
    schema_version: int
    tool_version: str
    created_at: str
    variant: Variant
    axes: list[str]
    config_columns: list[str]
    categories: dict[str, list[str]]
    phases: dict[Phase, PhaseMeta]
    training: TrainingSummary
    held_out: HeldOut | None
    closed_form: ClosedFormMeta
    embedding: EmbeddingMeta | None
    lightgbm_params: dict[str, Any]
    request_prediction: str
    tables: TablesMeta | None = None  # absent in models saved before the tables existed: compiled on load
    axis_ranges: dict[str, AxisRange] | None = None  # absent in older models: derived from training.configs


def closed_form_from_meta(meta: ModelMeta, phase: Phase) -> ClosedForm:
    """The closed-form fit of one phase stored in the metadata."""
    cf = meta.closed_form
    records: Sequence[Mapping[str, Any]] = cf.prefill if phase == "prefill" else cf.decode
    pooled = cf.pooled_prefill if phase == "prefill" else cf.pooled_decode
    return ClosedForm.from_records(phase, meta.axes, records, pooled)


def finite_or_none(value: float) -> float | None:
    """JSON-safe float (NaN/inf → None)."""
    return value if math.isfinite(value) else None


def axis_ranges(
    configs: Sequence[Mapping[str, Any]], columns: Sequence[str], numeric: Sequence[str] = ()
) -> dict[str, AxisRange]:
    """What each config axis's trained values mean: categorical by default, numeric where asked."""
    out: dict[str, AxisRange] = {}
    for c in columns:
        values = sorted({key_part(cfg[c]) for cfg in configs if c in cfg}, key=_sort_key)
        if c in numeric:
            nums = [x for x in (number(v) for v in values) if x is not None]
            if len(nums) != len(values):
                raise EstimatorError(f"axis {c} is marked numeric but has non-numeric values {values}")
            out[c] = AxisRange(kind="numeric", values=values, min=min(nums), max=max(nums))
        else:
            out[c] = AxisRange(kind="categorical", values=values)
    return out


def _sort_key(v: str) -> tuple[int, float, str]:
    x = number(v)
    return (0, x, "") if x is not None else (1, 0.0, v)


def number(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def checked_file(folder: Path, name: str, sha: str | None, what: str) -> Path:
    path = folder / name
    if Path(name).name != name or not path.is_file():
        raise EstimatorError(f"{folder}: missing {what} {name!r}")
    if sha is not None and sha256_of(path) != sha:
        raise EstimatorError(f"{path}: content does not match meta.json (truncated or edited {what})")
    return path


def check_meta(meta: ModelMeta, meta_path: Path) -> None:
    if meta.format_version != FORMAT_VERSION:
        raise EstimatorError(f"{meta_path}: model format_version {meta.format_version} (expected {FORMAT_VERSION})")
    if meta.schema_version not in SCHEMA_VERSIONS:
        raise EstimatorError(
            f"{meta_path}: trained on results schema_version {meta.schema_version}, "
            f"this estimator reads {', '.join(map(str, SCHEMA_VERSIONS))}"
        )
    if set(meta.phases) != set(PHASES):
        raise EstimatorError(f"{meta_path}: metadata must describe both phases, has {sorted(meta.phases)}")
    if (meta.variant == "embedding") != (meta.embedding is not None):
        raise EstimatorError(f"{meta_path}: variant {meta.variant!r} and embedding metadata disagree")
    if meta.embedding and (meta.embedding.chunk_words, meta.embedding.max_chunks) != (CHUNK_WORDS, MAX_CHUNKS):
        raise EstimatorError(
            f"{meta_path}: embeddings were chunked as {meta.embedding.chunk_words} words × "
            f"{meta.embedding.max_chunks}, this estimator uses {CHUNK_WORDS} × {MAX_CHUNKS}"
        )
    if meta.tables is not None and meta.tables.version != TABLES_VERSION:
        raise EstimatorError(f"{meta_path}: tables version {meta.tables.version} (expected {TABLES_VERSION})")
