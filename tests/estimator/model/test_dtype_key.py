"""The dtype an engine computed in is part of a config: a float32 model refuses a bfloat16 question."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from estimator import EstimatorError, LatencyEstimator
from estimator.cli import app
from estimator.data.runs import load_runs
from estimator.model.train import train_estimator
from tests.estimator.conftest import write_run

CONFIG = {"tier": 1, "top_k": 0, "blocks": 32}


def _with_dtype(run: Path, dtype: str | None, in_manifest: bool = False) -> Path:
    """Give every sample row `dtype`, or (in_manifest) leave the rows without it and record it the way older runs
    did: in the manifest's engine_starts[].effective, by engine_config_id."""
    configs = set()
    for f in (run / "samples").glob("*.parquet"):
        frame = pd.read_parquet(f)
        frame["engine_config_id"] = "cfg-" + frame["tier"].astype(str)
        configs |= set(frame["engine_config_id"])
        if not in_manifest:
            frame["dtype"] = dtype
        frame.to_parquet(f, index=False)
    if in_manifest:
        m = json.loads((run / "manifest.json").read_text())
        m["engine_starts"] = [{"engine_config_id": c, "effective": {"dtype": dtype}} for c in sorted(configs)]
        (run / "manifest.json").write_text(json.dumps(m))
    return run


@pytest.fixture(scope="module")
def float32_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = _with_dtype(write_run(tmp_path_factory.mktemp("f32")), "float32")
    runset = load_runs([run])
    assert runset.config_columns[-1] == "dtype"
    return train_estimator(runset, "tokens", held_out=False).save(tmp_path_factory.mktemp("m") / "f32")


def test_a_float32_model_refuses_bfloat16_unless_allowed(float32_model: Path) -> None:
    est = LatencyEstimator.load(float32_model)
    assert est.meta.config_columns[-1] == "dtype"
    asked = est.predict_request(CONFIG, text_tokens=100, new_tokens=8)  # the one trained dtype is filled in
    assert est.predict_request({**CONFIG, "dtype": "float32"}, 100, 8).total_ms == asked.total_ms
    with pytest.raises(EstimatorError, match=r"dtype=bfloat16 was never trained \(trained values: float32\)"):
        est.predict_request({**CONFIG, "dtype": "bfloat16"}, 100, 8)
    guess = est.predict_request({**CONFIG, "dtype": "bfloat16"}, 100, 8, allow_unseen=True)
    assert guess.unseen == ("dtype=bfloat16",)


def test_the_cli_refuses_a_bfloat16_question_in_one_line(float32_model: Path) -> None:
    args = ["predict", "--model", str(float32_model), "--tier", "1", "--top-k", "0", "--blocks", "32",
            "--text-tokens", "100", "--new-tokens", "8"]
    runner = CliRunner()
    bad = runner.invoke(app, [*args, "--dtype", "bfloat16"])
    assert bad.exit_code == 2
    errors = [line for line in bad.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "dtype=bfloat16 was never trained (trained values: float32)" in errors[0]
    assert runner.invoke(app, [*args, "--dtype", "float32"]).exit_code == 0


def test_older_runs_take_the_dtype_from_their_manifest(tmp_path: Path) -> None:
    run = _with_dtype(write_run(tmp_path), "bfloat16", in_manifest=True)
    runset = load_runs([run])
    assert "dtype" in runset.config_columns and set(runset.samples["dtype"]) == {"bfloat16"}
    plain = load_runs([write_run(tmp_path / "plain")])  # nothing recorded anywhere: no dtype in the key
    assert "dtype" not in plain.config_columns
