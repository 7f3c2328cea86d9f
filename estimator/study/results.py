"""Typed study results as they are saved: `compare.json` is the serialisation of `ComparisonResult`.

The report reads these models back (`load_comparison`) and renders their fields; it never parses the JSON as
untyped dicts, and never refits or re-predicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from estimator.errors import EstimatorError, one_line_validation_error
from estimator.strict import StrictModel


class NoiseFloorResult(StrictModel):
    """Same-prompt leave-one-out MAPE (%) over `rows` rows in `groups` groups of repeats; `corrected_mape_pct`
    removes the small-n leave-one-out inflation (each APE × sqrt((n−1)/n), docs/noise-floor.md)."""

    mape_pct: float | None
    rows: int
    groups: int
    corrected_mape_pct: float | None = None


class ScoreResult(StrictModel):
    """One model on one held-out split and phase. Errors in %, MAE in ms, cost of one prediction in µs."""

    split: str
    phase: str
    model: str
    kind: str
    r2: float | None = None
    mae_ms: float | None = None
    mape_pct: float | None = None
    p90_ape_pct: float | None = None
    mape_vs_noise_floor: float | None = None
    cost_us: float | None = None
    train_s: float | None = None
    n_train: int | None = None
    n_test: int | None = None


class ImprovementResult(StrictModel):
    """A variant's held-out MAPE against `tokens` on one split and phase: relative (%) and in points."""

    split: str
    phase: str
    model: str
    mape_pct: float | None
    tokens_mape_pct: float | None
    improvement_pct: float | None
    improvement_points: float | None
    reading: str


class VerdictResult(StrictModel):
    rule: str
    embedding_answer: list[str]
    improvements: list[ImprovementResult]
    sufficiency: dict[str, Any]
    sufficiency_note: str
    extrapolation: dict[str, Any]
    lines: list[str]


class IntervalResult(StrictModel):
    """A figure averaged over folds with its 95% interval (`method`: `t` = corrected resampled t over `n` folds,
    `bootstrap` = prompts resampled `n` times, `none` = no interval)."""

    mean: float | None
    low: float | None
    high: float | None
    method: str
    n: int


class CellResult(StrictModel):
    """One learner × feature variant (or a reference model) on one held-out question and phase, over its folds.

    `by_construction`: the figure equals `tokens`' for a structural reason (trees and monotone transforms);
    `identical_to_tokens`: whether every fold's predictions were in fact identical to the same learner's tokens.
    `mape_vs_noise_floor`: MAPE on the rows the noise floor is computed on, over the corrected floor.
    """

    question: str
    phase: str
    model: str
    learner: str
    variant: str
    kind: str
    folds: int
    mape_pct: IntervalResult
    r2: IntervalResult
    mae_ms: IntervalResult
    p90_ape_pct: IntervalResult
    mape_on_floor_rows_pct: float | None = None
    mape_vs_noise_floor: float | None = None
    by_construction: bool = False
    identical_to_tokens: bool | None = None
    train_s: float = 0.0


class PairedResult(StrictModel):
    """`model` against `baseline` (same learner's tokens, or LightGBM tokens for a reference) on the same folds:
    relative MAPE reduction (%) with its interval, and the rule's decision."""

    question: str
    phase: str
    model: str
    baseline: str
    improvement_pct: IntervalResult
    decision: str
    prompts_per_point_needed: float | None = None
    by_construction: bool = False
    note: str = ""


class HeldOutFloorResult(StrictModel):
    """The noise floor on the held-out rows of one question and phase: same-prompt repeats predicted by the mean
    of the others, raw and corrected (× sqrt((n−1)/n)), averaged over the folds."""

    question: str
    phase: str
    raw_mape_pct: IntervalResult
    corrected_mape_pct: IntervalResult
    rows: int
    repeats: list[int]


class RepeatedResult(StrictModel):
    """Experiment 2 over repeated grouped folds: every figure with a 95% interval, three held-out questions."""

    k: int
    seeds: int
    max_decode_rows: int
    questions: dict[str, str]
    folds: dict[str, int]
    prompts_per_point: float
    rule: str
    cells: list[CellResult]
    paired: list[PairedResult]
    noise_floor: list[HeldOutFloorResult]
    lines: list[str]
    timings_s: dict[str, float] = {}


class ComparisonResult(StrictModel):
    """Experiment 2 as saved in `<run>/compare/compare.json` (per-row predictions in predictions.parquet)."""

    experiment: str
    runs: list[str]
    splits: dict[str, str]
    latency_scale_ms: dict[str, dict[str, float]]
    noise_floor: dict[str, NoiseFloorResult]
    scores: list[ScoreResult]
    verdict: VerdictResult
    error_analysis: dict[str, Any]
    timings_s: dict[str, float]
    repeated: RepeatedResult | None = None


def load_comparison(path: Path) -> ComparisonResult:
    """Read and validate compare.json; a damaged or foreign file is an EstimatorError naming it."""
    try:
        return ComparisonResult.model_validate(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise EstimatorError(f"{path}: unreadable comparison ({exc})") from exc
    except ValidationError as exc:
        raise EstimatorError(f"{path}: not a comparison written by `estimate compare`: "
                             f"{one_line_validation_error(exc)}") from exc
