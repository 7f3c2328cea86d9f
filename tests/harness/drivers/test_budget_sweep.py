"""A budgeted sweep on the real CPU engine: the coarse design, refinement on the same engine start, the manifest's
record of what was chosen and why, and the per-machine cost cache it leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.drivers.budget import CostCache
from tests.conftest import ROOT


def test_budgeted_sweep_records_its_choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """70 s with a 30 s start cached for the model: one engine config, its coarse design, and refinement rounds
    on the same start until its share is spent or every interval is within the noise floor."""

    spec = tmp_path / "spec.toml"
    spec.write_text(
        'budget = "70s"\nreps = 2\nsame_prompt_repeats = 2\nmax_new_tokens = 5\nwarmup_requests = 1\n'
        "[axes]\ntext_tokens = [16, 64, 128, 256, 512]\ntier = [0]\ntop_k = [0]\nblocks = [32]\n"
    )
    cache = tmp_path / "cache"
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(cache))
    CostCache.load().record("cpu|cpu-tiny", start_s=30.0)
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "sweep", "--spec", str(spec), "--out", str(tmp_path), "--name", "b",
         "--quiet"], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    adaptive = manifest["adaptive"]
    assert adaptive["budget"]["budget_s"] == 70
    (group,) = adaptive["groups"].values()
    coarse = [p for p in group["points"] if p["why"] == "coarse"]
    assert sorted(p["text_tokens"] for p in coarse) == [16, 64, 256, 512]  # 4 spread over the axis
    refined = [p for p in group["points"] if p["why"] == "refine"]
    # choose() takes only ratios above 1 (test_budget.py); the manifest keeps them to 2 decimals, so 1.004 reads 1.0
    assert all(p["ratio"] >= 1 and p["text_tokens"] not in (16, 64, 256, 512) for p in refined)
    assert group["stopped"] in ("budget spent", "every interval within the noise floor", "no lengths left to measure")
    assert group["rounds"] == len({p["round"] for p in refined})
    for key in ("refine_share_s", "fit_s", "refine_s", "group_s", "start_and_coarse_s"):
        assert group[key] >= 0
    assert manifest["status"] == "complete"
    assert manifest["points_done"] == manifest["points_total"] == len(group["points"])
    samples = pd.read_parquet(tmp_path / "b" / "samples")
    assert set(samples.point_id) == {p["point_id"] for p in group["points"]}
    same = samples[samples.prompt_kind == "same"]
    assert set(same.text_tokens) == {16, 64, 256, 512}  # noise-floor groups on the coarse design only
    costs = json.loads(next(cache.glob("engine-costs-*.json")).read_text())
    assert len(costs["cpu|cpu-tiny"]["start_s"]) == 2 and costs["cpu|cpu-tiny"]["request_s"] > 0  # + this start
    (start,) = manifest["engine_starts"]
    assert set(start["phases_s"]) >= {"engine_core_up", "worker_up", "ready"}  # the start's breakdown
