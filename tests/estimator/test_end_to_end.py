"""analyze → train → compare → predict through the CLI on a small REAL CPU sweep (`small_run`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from estimator import LatencyEstimator
from estimator.cli import app
from estimator.data.runs import load_runs

runner = CliRunner()
pytestmark = pytest.mark.slow


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output[-3000:]
    return result.stdout


def test_analyze(small_run: Path, tmp_path: Path) -> None:
    out = _ok(["analyze", str(small_run), "--out", str(tmp_path / "analysis")])
    assert "Experiment 1" in out
    payload = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    for phase in ("prefill", "decode"):
        assert payload["summary"][phase]["noise_floor"]["groups"] > 0
        assert payload["summary"][phase]["median_cv_distinct_pct"] is not None
    assert len(pd.read_csv(tmp_path / "analysis" / "analysis.csv")) > 0


def test_train_and_predict(small_run: Path, tmp_path: Path) -> None:
    model = tmp_path / "models" / "tokens"
    _ok(["train", str(small_run), "--variant", "tokens", "--out", str(model)])
    est = LatencyEstimator.load(model)
    t = est.meta.training
    config = {k: v for k, v in t.configs[0].items() if k in est.meta.axes}
    flags = [f"--{k.replace('_', '-')}" if k in ("tier", "top_k", "blocks") else "--axis" for k in config]
    args: list[str] = []
    for flag, (k, v) in zip(flags, config.items(), strict=True):
        args += [flag, str(v) if flag != "--axis" else f"{k}={v}"]
    reports = []
    for n in (t.text_tokens_min, t.text_tokens_max):
        out = _ok(
            ["predict", "--model", str(model), *args, "--text-tokens", str(n), "--new-tokens", "8", "--json"]
        )
        reports.append(json.loads(out))
    short, long = reports
    assert long["prefill_ms"] > short["prefill_ms"]
    assert long["total_ms"] > short["total_ms"]
    assert short["decode_ms_total"] == pytest.approx(short["decode_ms_total_exact"])


def test_compare(small_run: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "compare"
    out = _ok(["compare", str(small_run), "--out", str(out_dir), "--cost-calls", "20", "--folds", "3", "--seeds", "1"])
    assert "Verdict" in out
    payload = json.loads((out_dir / "compare.json").read_text())
    models = {s["model"] for s in payload["scores"]}
    assert {"tokens", "buckets", "poly", "embedding", "residual", "closed_form", "random_forest"} <= models
    assert {s["split"] for s in payload["scores"]} == {"by_prompt", "by_length"}
    assert payload["verdict"]["lines"]
    scores = pd.read_csv(out_dir / "compare.csv")
    assert (scores["mape_pct"] > 0).all()
    preds = pd.read_parquet(out_dir / "predictions.parquet")
    samples = load_runs([small_run]).samples
    by_prompt = preds[(preds["split"] == "by_prompt") & (preds["predictor"] == "tokens")]
    assert 0 < len(by_prompt) < len(samples)
