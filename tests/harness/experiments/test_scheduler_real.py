"""`profile experiment scheduler` end to end on the real engine, small: one engine start measures capacity, the
requests alone and every policy's traces; the estimator's side (SLO choice, statistics) runs over the folder's
files, and a rerun resumes instead of measuring again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[3]
REPLAY = ROOT / "tests" / "fixtures" / "replays" / "bursty-1"


@pytest.mark.slow
def test_the_scheduler_experiment_runs_every_policy_on_one_start(tmp_path: Path) -> None:
    model = tmp_path / "iter"
    subprocess.run([sys.executable, "-m", "estimator.cli", "train", str(REPLAY), "--target", "iteration", "--out",
                    str(model)], check=True, capture_output=True, timeout=300)
    args = [sys.executable, "-m", "harness.cli", "experiment", "scheduler", str(model), "--out", str(tmp_path / "x"),
            "--count", "6", "--seeds", "1", "--mults", "0.5,1.5", "--policies", "fcfs,estimate,oracle"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "x" / "raw").iterdir()) == [
        f"{p}-{m}-1.parquet" for p in ("estimate", "fcfs", "oracle") for m in ("0.5", "1.5")]
    setup = json.loads((tmp_path / "x" / "setup.json").read_text())
    assert setup["slo_scale"] >= 2 and set(setup["slo"]) == {"chat", "code"} and setup["engine"]["max_num_seqs"] == 4
    assert setup["mix"]["name"] == "classes" and (tmp_path / "x" / setup["lengths"]).is_file()
    result = json.loads((tmp_path / "x" / "results.json").read_text())
    assert [g["policy"] for g in result["goodput"]] == ["fcfs", "estimate", "oracle"]
    assert [g["output_known"] for g in result["goodput"]] == [False, False, True]
    assert all(g["mix"] == "classes" and g["spearman_rho"] < 0 and g["seeds"] == [1] for g in result["goodput"])
    estimate = pd.read_parquet(tmp_path / "x" / "raw" / "estimate-1.5-1.parquet")
    assert (estimate["decision_us"] > 0).all() and len(estimate) == 6  # decided at arrival by the installed policy
    # the engine generated the true lengths while every client declared the cap
    assert (estimate["max_tokens"] == 256).all() and (estimate["new_tokens"] < 256).all()
    assert set(estimate["client_class"]) == {"chat", "code"}
    assert "goodput req/s" in proc.stdout and (tmp_path / "x" / "attainment.png").stat().st_size > 1000
    again = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert again.returncode == 0 and "the analysis only" in again.stdout  # every cell kept: no engine start
    other = subprocess.run([*args, "--mix", "bimodal"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert other.returncode == 2 and "holds the mix classes, not bimodal" in other.stdout + other.stderr
