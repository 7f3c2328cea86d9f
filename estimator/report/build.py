"""The run report: gather the inputs (runs, typed study results, the model's predictions, telemetry, nightly
history), then let each section render them, and write one self-contained HTML page and a Markdown twin.

Sections (in page order, keys in `SECTIONS`): at a glance, run manifest, latency vs prompt length and KV position
(with the closed-form fit per tier), Experiment 1 (CV per text_tokens vs the noise floor), predicted vs measured
for a chosen model, Experiment 2 (error per variant, from `<run>/compare/compare.json`), telemetry timeline,
LightGBM feature importance, and, for the nightly job, the trend over nights. A missing input (no model, no
compare/, no telemetry) turns its section into a note that says what to run; the page is always written.
All fitting and predicting happens here, through the study and the model; the sections only draw and format.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from pydantic import field_validator

from estimator.data.runs import RunSet, RunsSpec, load_runs, read_telemetry
from estimator.errors import EstimatorError
from estimator.model.importance import feature_importance
from estimator.report.document import Report, ReportFiles
from estimator.report.plots import group_column
from estimator.report.sections.accuracy import accuracy_section
from estimator.report.sections.batch import batch_section
from estimator.report.sections.glance import glance_section
from estimator.report.sections.importance import importance_section
from estimator.report.sections.latency import latency_section
from estimator.report.sections.manifest import manifest_section
from estimator.report.sections.nightly import nightly_section
from estimator.report.sections.scheduling import scheduling_section
from estimator.report.sections.simulation import simulation_section
from estimator.report.sections.spread import spread_section
from estimator.report.sections.telemetry import MAX_TELEMETRY_RUNS, telemetry_section
from estimator.report.sections.variants import variants_section
from estimator.sim.validation import SimulationValidation
from estimator.study.analyze import Analysis, analyze_runs, noise_floor
from estimator.study.batch import BatchStudyResult, ValidationResult
from estimator.study.fits import latency_fits
from estimator.study.nightly_results import NightlySummary, load_history, load_nightly_summary
from estimator.study.results import ComparisonResult, load_comparison
from estimator.study.scoring import ModelOnRuns, held_out_predictions, score_model_on_runs

T = TypeVar("T")


class ReportSpec(RunsSpec):
    """What `estimate report` does: which runs, which model (optional), where the page goes.

    `history` (nightly JSONL) and `nightly_summary` (tonight's summary JSON) add the nightly section.
    """

    out: Path
    model: Path | None = None
    history: Path | None = None
    nightly_summary: Path | None = None
    batch: list[Path] = []  # batch runs whose batch/ and validation/ outputs add the batch-level section
    simulation: Path | None = None  # a simulation validation JSON (estimate experiment simulate-validate --json)
    scheduler: Path | None = None  # the scheduler experiment's results.json (profile experiment scheduler)
    calibration: Path | None = None  # the calibration study's JSON (estimate experiment calibration --json)
    title: str | None = None

    @field_validator("model")
    @classmethod
    def _model_exists(cls, model: Path | None) -> Path | None:
        if model is not None and not (model / "meta.json").is_file():
            raise ValueError(f"{model} is not a model folder (no meta.json; write one with `estimate train`)")
        return model


def _compare_dir(runset: RunSet) -> Path | None:
    path = runset.runs[0].path / "compare"
    return path if (path / "compare.json").is_file() or (path / "predictions.parquet").is_file() else None


def _comparison(compare_dir: Path | None) -> tuple[ComparisonResult | str | None, Path | None]:
    path = compare_dir / "compare.json" if compare_dir else None
    if path is None or not path.is_file():
        return None, None
    try:
        return load_comparison(path), path
    except EstimatorError as exc:
        return str(exc), path


def _batch_inputs(runs: list[Path]) -> tuple[BatchStudyResult | None, list[tuple[ValidationResult, pd.DataFrame]]]:
    """The typed batch-level results saved by `estimate batch` and `estimate validate` in these run folders."""
    study = None
    validations = []
    for run in runs:
        path = run / "batch" / "batch.json"
        if study is None and path.is_file():
            study = _read_model(BatchStudyResult, path)
        vpath = run / "validation" / "validation.json"
        if vpath.is_file() and (run / "validation" / "iterations.parquet").is_file():
            rows = pd.read_parquet(run / "validation" / "iterations.parquet")
            validations.append((_read_model(ValidationResult, vpath), rows))
    return study, validations


def load_scheduling(path: Path) -> dict[str, Any]:
    """the scheduler experiment's results.json (profile experiment scheduler) (EstimatorError naming what is wrong)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EstimatorError(f"{path}: unreadable scheduler results ({exc})") from None
    missing = [k for k in ("setup", "rows", "goodput") if k not in data] if isinstance(data, dict) else ["an object"]
    if missing:
        raise EstimatorError(f"{path}: not the scheduler experiment's results (no {', '.join(missing)})")
    return dict(data)


def load_calibration_study(path: Path) -> dict[str, Any]:
    """The study JSON; EstimatorError (one line) when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EstimatorError(f"{path}: unreadable calibration study ({exc})") from None
    if not isinstance(data, dict) or not {"starts", "across_starts", "targets"} <= set(data):
        raise EstimatorError(f"{path}: not a calibration study (estimate experiment calibration --json)")
    return data


def _or_error(load: Callable[[Path], T], path: Path) -> T | str:
    """What `load` reads from `path`, or its one-line error (the section then says the input was unreadable)."""
    try:
        return load(path)
    except EstimatorError as exc:
        return str(exc)


def _read_model(cls: Any, path: Path) -> Any:
    try:
        return cls.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise EstimatorError(f"{path}: unreadable ({exc})") from exc


def build_report(spec: ReportSpec, progress: Callable[[str], None] | None = None) -> Report:
    """Load the runs (and the model, compare/ outputs, nightly history), compute what the sections show, and
    build every section."""
    say = progress or (lambda _msg: None)
    runset = load_runs(spec.runs)
    run_ids = [r.run_id for r in runset.runs]
    compare_dir = _compare_dir(runset)
    group = group_column(runset)
    missing: list[str] = []
    if spec.model is None:
        missing.append("a model (`--model models/NAME`): no predicted-vs-measured plot, no feature importance")
    if compare_dir is None:
        missing.append(
            f"`estimate compare {runset.runs[0].path}` outputs: no variant comparison, no held-out predictions"
        )
    say("manifest")
    manifest = manifest_section(runset)
    say("latency vs length")
    latency = latency_section(runset, latency_fits(runset, group))
    say("Experiment 1")
    analysis: Analysis | str
    try:
        analysis = analyze_runs(runset)
    except EstimatorError as exc:
        analysis = str(exc)
    spread, exp1 = spread_section(runset, analysis)
    floors = {p: f.corrected_mape_pct for p, f in noise_floor(runset.samples, runset.config_columns).items()}
    say("predicted vs measured")
    model: ModelOnRuns | None = score_model_on_runs(spec.model, runset, group) if spec.model is not None else None
    variant = model.estimator.meta.variant if model is not None else "tokens"
    held = held_out_predictions(compare_dir, variant)
    accuracy, acc = accuracy_section(runset, model, held, compare_dir, floors)
    say("variants")
    comparison, comparison_path = _comparison(compare_dir)
    variants, var = variants_section(comparison, comparison_path, run_ids)
    say("telemetry")
    telemetry = telemetry_section(runset, {r.run_id: read_telemetry(r.path) for r in runset.runs[:MAX_TELEMETRY_RUNS]})
    say("feature importance")
    imp = feature_importance(spec.model) if spec.model is not None else None
    importance = importance_section(spec.model, imp)
    sections = [manifest, latency, spread, accuracy, variants, telemetry, importance]
    if spec.batch:
        say("batch level")
        sections.append(batch_section(*_batch_inputs(spec.batch)))
    if spec.simulation is not None:
        say("simulation")
        from estimator.sim.validation import load_validation

        sim: SimulationValidation | str = _or_error(load_validation, spec.simulation)
        sections.append(simulation_section(sim))
    if spec.calibration is not None:
        say("calibration")
        from estimator.report.sections.calibration import calibration_section

        drift = {p.stem.removeprefix("drift-"): p.read_bytes() for p in spec.calibration.parent.glob("drift-*.png")}
        sections.append(calibration_section(_or_error(load_calibration_study, spec.calibration), drift))
    if spec.scheduler is not None:
        say("scheduling")
        sections.append(scheduling_section(_or_error(load_scheduling, spec.scheduler)))
    summary: NightlySummary | None = None
    if spec.nightly_summary is not None and spec.nightly_summary.is_file():
        summary = load_nightly_summary(spec.nightly_summary)
    if spec.history is not None or summary is not None:
        say("nightly trend")
        history = load_history(spec.history) if spec.history is not None and spec.history.is_file() else []
        sections.insert(0, nightly_section(history, summary))  # the reason a nightly page exists: first
    glance = glance_section(runset, exp1, acc, var, summary, missing)
    title = spec.title or f"Latency report: {', '.join(run_ids)}"
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"Generated {generated} by `estimate report` from {', '.join(str(r.path) for r in runset.runs)}"
    if spec.model is not None:
        subtitle += f" with model {spec.model}"
    return Report(title=title, subtitle=subtitle, sections=[glance, *sections], missing=missing)


def write_report(spec: ReportSpec, progress: Callable[[str], None] | None = None) -> ReportFiles:
    """Build the report of `spec` and write it into `spec.out`."""
    return build_report(spec, progress).write(spec.out)
