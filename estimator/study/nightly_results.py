"""Typed nightly results as they are saved: `summaries/<run>.json` (and `latest.json`) is the serialisation of
`NightlySummary`, each line of `history.jsonl` of `HistoryLine`.

The nightly job (estimator/nightly/job.py) validates what it writes through these models, and the report reads
them back with `load_nightly_summary` / `load_history`: no section parses the JSON as untyped dicts. Latencies in
ms, MAPE in %, ratios tonight / baseline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError

from estimator.errors import EstimatorError, one_line_validation_error
from estimator.strict import StrictModel


class ConfirmRun(StrictModel):
    """The re-run made when a config was flagged: its ratio, CI and flag (None when it did not measure it)."""

    ratio: float | None
    ci: list[float] | None
    flagged: bool
    tonight_median_ms: float | None


class ConfigComparison(StrictModel):
    """Tonight against the baseline for one config and phase: medians (ms), the ratio with its bootstrap CI,
    the re-run and the control limit from the accepted nights (`history`), and the verdict."""

    config: dict[str, Any]
    label: str
    phase: str
    baseline_median_ms: float
    tonight_median_ms: float
    ratio: float
    ci: list[float]
    requests: str
    text_tokens: list[int]
    models: dict[str, list[str]]
    flagged: bool
    improved: bool
    confirm: ConfirmRun | None = None
    history: dict[str, Any] | None = None


class MapeComparison(StrictModel):
    """The estimator's held-out MAPE (%) per phase, tonight against the baseline."""

    phase: str
    baseline_mape_pct: float | None
    tonight_mape_pct: float | None
    growth_pct: float | None
    flagged: bool
    history: dict[str, Any] | None = None  # the accepted nights' limit on this phase's MAPE


class ConfigMedian(StrictModel):
    """One night's median per-request latency (ms) for one config and phase: a point of the trend plot."""

    config: dict[str, Any]
    label: str
    phase: str
    median_ms: float
    requests: int
    flagged: bool = False  # history lines only: flagged as a regression that night
    canary_ms: float | None = None  # the run's CPU canary for this phase (ms per pass); None without one


class NightlySummary(StrictModel):
    """One night as `estimate nightly` saved it (summaries/<run_id>.json)."""

    model_config = ConfigDict(populate_by_name=True)  # merged with StrictModel's: `schema` or `schema_id`

    schema_id: str = Field(alias="schema")
    night: str
    run_id: str
    run_path: str
    model_path: str
    report_path: str | None
    baseline_run_id: str | None
    baseline_run_path: str | None
    baseline_source: str | None
    confirm_run_id: str | None
    first_night: bool
    accepted: bool
    regression: bool
    flagged: list[str]
    exit_code: int
    rule: str
    thresholds: dict[str, float | int]
    config_axes: list[str]
    comparisons: list[ConfigComparison]
    estimator_checks: list[MapeComparison]
    held_out_mape_pct: dict[str, float | None]
    conditions: dict[str, dict[str, float | None]]
    medians: list[ConfigMedian]
    sweep: dict[str, Any] | None
    interleaved: dict[str, Any] | None = None  # estimate nightly --interleave: rounds, order, runs, verdicts
    warnings: list[str]
    messages: list[str]

    def as_json(self) -> dict[str, Any]:
        """The summary as written to disk (the `schema` key by its name)."""
        return self.model_dump(mode="json", by_alias=True)


class HistoryLine(StrictModel):
    """One line of history.jsonl: a night's verdict and its medians. `control`: the control limits may learn from
    this night (missing on lines older than the control limits: promoted, or not flagged)."""

    night: str
    run_id: str
    baseline_run_id: str | None
    regression: bool
    accepted: bool
    control: bool | None = None
    exit_code: int
    flagged: list[str]
    held_out_mape_pct: dict[str, float | None]
    medians: list[ConfigMedian]


def load_nightly_summary(path: Path) -> NightlySummary:
    """Read and validate a nightly summary; a damaged or foreign file is an EstimatorError naming it."""
    try:
        return NightlySummary.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise EstimatorError(f"{path}: unreadable nightly summary ({exc})") from exc
    except ValidationError as exc:
        raise EstimatorError(f"{path}: not a summary written by `estimate nightly`: "
                             f"{one_line_validation_error(exc)}") from exc


def load_history(path: Path) -> list[HistoryLine]:
    """history.jsonl, one HistoryLine per night. A line that is not JSON (cut short by a kill mid-write) is
    skipped, as the job's control limits skip it; a JSON line of another shape is an EstimatorError naming it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EstimatorError(f"{path}: unreadable nightly history ({exc.strerror or exc})") from exc
    out = []
    for n, line in enumerate(lines, 1):
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            continue
        try:
            out.append(HistoryLine.model_validate(raw))
        except ValidationError as exc:
            raise EstimatorError(f"{path}:{n}: not a history line written by `estimate nightly`: "
                                 f"{one_line_validation_error(exc)}") from exc
    return out
