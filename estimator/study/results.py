"""Typed study results as they are saved: `compare.json` is the serialisation of `ComparisonResult`.

The report reads these models back (`load_comparison`) and renders their fields; it never parses the JSON as
untyped dicts, and never refits or re-predicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from estimator.errors import EstimatorError, one_line_validation_error


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoiseFloorResult(_Record):
    """Same-prompt leave-one-out MAPE (%) over `rows` rows in `groups` groups of repeats."""

    mape_pct: float | None
    rows: int
    groups: int


class ScoreResult(_Record):
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


class ImprovementResult(_Record):
    """A variant's held-out MAPE against `tokens` on one split and phase: relative (%) and in points."""

    split: str
    phase: str
    model: str
    mape_pct: float | None
    tokens_mape_pct: float | None
    improvement_pct: float | None
    improvement_points: float | None
    reading: str


class VerdictResult(_Record):
    rule: str
    embedding_answer: list[str]
    improvements: list[ImprovementResult]
    sufficiency: dict[str, Any]
    sufficiency_note: str
    extrapolation: dict[str, Any]
    lines: list[str]


class ComparisonResult(_Record):
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


def load_comparison(path: Path) -> ComparisonResult:
    """Read and validate compare.json; a damaged or foreign file is an EstimatorError naming it."""
    try:
        return ComparisonResult.model_validate(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise EstimatorError(f"{path}: unreadable comparison ({exc})") from exc
    except ValidationError as exc:
        raise EstimatorError(f"{path}: not a comparison written by `estimate compare`: "
                             f"{one_line_validation_error(exc)}") from exc
