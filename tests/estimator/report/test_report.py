"""`estimate report`: one self-contained HTML page with every section and its figures, and a Markdown twin.

The slow tests build it from the session's real CPU sweep (`small_run`), after training a model and running
Experiment 2 on a copy of it; the fast ones cover GPU telemetry (throttled spans) and the graceful degradation
on synthetic runs.
"""

from __future__ import annotations

import base64
import html
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from estimator.cli.extra import report
from estimator.model.train import TrainSpec, train
from estimator.report.build import ReportSpec, write_report
from estimator.report.document import SECTIONS
from estimator.report.sections.telemetry import throttled_spans
from estimator.study.compare import CompareSpec, compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
OWN_INPUTS = ("nightly", "batch", "simulation", "calibration", "scheduling")  # sections drawn only from their own files
BASE_SECTIONS = [k for k in SECTIONS if k not in OWN_INPUTS]


def _check_page(out: Path, sections: list[str], n_images: int) -> tuple[str, str]:
    """Every section in both files; `n_images` inlined PNGs in the HTML and as files beside the Markdown."""
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for key in sections:
        assert f'<section id="{key}"><h2>{html.escape(SECTIONS[key])}</h2>' in page, key
        assert f"\n## {SECTIONS[key]}\n" in md, key
    images = DATA_URI.findall(page)
    assert len(images) == page.count("<img ") == n_images
    for data in images:
        assert base64.b64decode(data).startswith(PNG_MAGIC)
    refs = re.findall(r"!\[[^\]]*\]\((fig-[\w-]+\.png)\)", md)
    assert len(refs) == n_images
    for ref in refs:
        assert (out / ref).read_bytes().startswith(PNG_MAGIC)
    # Self-contained: no scripts, no stylesheets or images fetched from anywhere.
    assert "<script" not in page and "<link" not in page
    assert not re.search(r'(src|href)="(https?:)?//', page)
    return page, md


# ---------------------------------------------------------------- the real sweep (slow)


@pytest.fixture(scope="module")
def studied_run(small_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of small_run with compare/ written into it, and a model trained on it."""
    root = tmp_path_factory.mktemp("report")
    run = root / small_run.name
    shutil.copytree(small_run, run)
    model = root / "models" / "tokens"
    train(TrainSpec(runs=[run], out=model))
    compare(
        CompareSpec(
            runs=[run],
            variants=["tokens", "poly"],
            cost_calls=5,
            folds=3,
            seeds=1,  # type: ignore[list-item]
            learners=["lightgbm", "ridge"],  # type: ignore[list-item]
        )
    )
    return run, model


@pytest.mark.slow
def test_report_of_a_real_run(studied_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, model = studied_run
    files = write_report(ReportSpec(runs=[run], model=model, out=tmp_path / "report"))
    # latency, CV spread, held-out and in-sample predicted-vs-measured, variants (one split, and the repeated folds'
    # intervals), telemetry, importance
    page, md = _check_page(tmp_path / "report", BASE_SECTIONS, 8)
    assert len(files.images) == 8
    assert (tmp_path / "report" / "fig-variants-intervals.png").is_file()
    assert "IN-SAMPLE" in page and "HELD OUT BY PROMPT" in page
    assert "Missing from this report" not in page
    for label in ("MAE ms", "MAPE %", "text_tokens", "CPU utilization (%)", "prefill gain %"):
        assert label in md and label in page
    assert "tier 0 · cpu-tiny" in page  # the closed-form table names tier and model
    assert "| status | complete" in md  # the manifest table


@pytest.mark.slow
def test_report_degrades_without_model_or_compare(small_run: Path, tmp_path: Path) -> None:
    """No model, no compare/: every section is still there and says what to run; the CLI writes it."""
    app = typer.Typer()
    app.command()(report)
    out = tmp_path / "bare"
    result = CliRunner().invoke(app, [str(small_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "self-contained" in result.stdout
    page, _ = _check_page(out, BASE_SECTIONS, 3)  # latency, CV spread, telemetry
    assert "No model given" in page and "estimate compare" in page
    assert "Missing from this report" in page


# ---------------------------------------------------------------- fast: synthetic runs


def _nvml_telemetry(run: Path) -> None:
    """A GPU telemetry file on the steps' clock: SM clock drops while bit 0x20 (SW thermal) is set."""
    t = np.linspace(0.0, 10.0, 401)
    throttle = np.where((t > 3) & (t < 5), 0x20, 0x1)
    (run / "telemetry").mkdir()
    pd.DataFrame(
        {
            "point_id": "p",
            "t_s": t,
            "source": "nvml",
            "sm_clock_mhz": np.where(throttle == 0x20, 1200.0, 1980.0),
            "power_w": 300.0 + 10 * np.sin(t),
            "temp_c": 60.0 + t,
            "gpu_util_pct": 95.0,
            "throttle_reasons": throttle,
        }
    ).to_parquet(run / "telemetry" / "p.parquet", index=False)
    # Put the steps inside the telemetry window, 1 ms apart.
    for f in (run / "samples").glob("*.parquet"):
        frame = pd.read_parquet(f)
        frame["t_start_s"] = np.linspace(0.5, 9.5, len(frame))
        frame["t_end_s"] = frame["t_start_s"] + frame["latency_ms"] / 1000
        frame.to_parquet(f, index=False)


def test_throttled_spans() -> None:
    tel = pd.DataFrame({"t_s": np.arange(8.0) + 100, "throttle_reasons": [0, 1, 4, 4, 1, 0x41, 0, 0x8]})
    assert throttled_spans(tel, 100.0) == [(2.0, 4.0), (5.0, 6.0), (7.0, 7.0)]
    assert throttled_spans(pd.DataFrame({"t_s": [1.0], "cpu_util_pct": [5.0]}), 0.0) == []


def test_gpu_telemetry_and_missing_pieces(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    run = run_writer(tmp_path / "results", tiers=(1,), top_ks=(0,), lengths=(32, 128, 512))
    _nvml_telemetry(run)
    out = tmp_path / "report"
    write_report(ReportSpec(runs=[run], out=out))
    page, md = _check_page(out, BASE_SECTIONS, 3)
    assert "Throttled (a clock-event reason other than GPU idle) for 2.0 s" in page
    assert "SM clock (MHz)" in md and "power (W)" in md and "temperature (°C)" in md


def test_batch_section_renders_the_study_and_validation(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    from estimator.model.iteration import train_iteration_estimator
    from estimator.study.batch import compare_feature_sets, validate_iterations, write_json
    from tests.estimator.conftest import write_batch_run

    run = run_writer(tmp_path / "results", tiers=(1,), top_ks=(0,), lengths=(32, 128, 512))
    batch = write_batch_run(tmp_path / "batch")
    write_json(compare_feature_sets([batch], k=3, seeds=1), batch / "batch" / "batch.json")
    train_iteration_estimator(
        [write_batch_run(tmp_path / "train", seed=5, run_id="20250106-000000-train")], tmp_path / "m"
    )
    result, rows = validate_iterations(tmp_path / "m", [batch])
    write_json(result, batch / "validation" / "validation.json")
    rows.to_parquet(batch / "validation" / "iterations.parquet")
    out = tmp_path / "report"
    write_report(ReportSpec(runs=[run], out=out, batch=[batch]))
    page, md = _check_page(out, [*BASE_SECTIONS, "batch"], 3)  # latency, spread and the batch validation
    assert "mean signed error %" in md and "decode-only" in md
    assert "reduction vs totals %" in md and "TTFT MAPE %" in md and "batch-validation" in md


def test_report_spec_errors(tmp_path: Path, synthetic_run: Path) -> None:
    app = typer.Typer()
    app.command()(report)
    result = CliRunner().invoke(app, [str(synthetic_run), "--out", str(tmp_path), "--model", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: model:") and "no meta.json" in result.stderr
    result = CliRunner().invoke(app, [str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_calibration_section_from_the_committed_study(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    """`estimate report --calibration docs/simulate/calibration.json`: a table per start, the drift plots beside."""
    study = Path(__file__).resolve().parents[3] / "docs" / "simulate" / "calibration.json"
    run = run_writer(tmp_path / "results", tiers=(1,), top_ks=(0,), lengths=(32, 128))
    out = tmp_path / "report"
    res = CliRunner().invoke(typer_app(), [str(run), "--out", str(out), "--calibration", str(study)])
    assert res.exit_code == 0, res.output
    page = (out / "report.html").read_text()
    assert f'<section id="calibration"><h2>{html.escape(SECTIONS["calibration"])}</h2>' in page
    assert "server floor (repeat vs first)" in page and "start-2: level" in page
    assert page.count("E2E-mean error per 10 s window") == 2 * 3  # three drift plots: each alt text and caption
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    res = CliRunner().invoke(typer_app(), [str(run), "--out", str(tmp_path / "r2"), "--calibration", str(bad)])
    assert res.exit_code == 0 and "Calibration study unreadable" in (tmp_path / "r2" / "report.html").read_text()


def typer_app() -> typer.Typer:
    app = typer.Typer()
    app.command()(report)
    return app
