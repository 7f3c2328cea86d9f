"""The package layout: no import cycles or oversized modules, and a scheduler's import pays only for the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.model.train import TrainSpec, train

ROOT = Path(__file__).resolve().parents[2]
# What `import estimator` + load + predict must never pull in: the study, the report, the nightly job, the CLI,
# and the heavy libraries only they need.
FORBIDDEN = ("matplotlib", "sklearn", "estimator.study", "estimator.report", "estimator.nightly", "estimator.cli")

PROBE = """
import json, sys
from estimator import LatencyEstimator
est = LatencyEstimator.load(sys.argv[1])
config = {k: est.meta.training.configs[0][k] for k in est.meta.config_columns}
est.predict_request(config, text_tokens=100, new_tokens=8)
print(json.dumps(sorted(sys.modules)))
"""


def test_no_cycles_no_oversized_modules() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_layout.py")], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no import cycles" in proc.stdout


@pytest.fixture(scope="module")
def tokens_model(synthetic_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("layout") / "tokens"
    train(TrainSpec(runs=[synthetic_run], out=out, variant="tokens"))
    return out


def test_scheduler_import_loads_only_the_model(tokens_model: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(tokens_model)], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.splitlines()[-1])
    assert "estimator.model.tables" in loaded  # the probe really ran the model: from its compiled tables,
    assert "lightgbm" not in loaded  # so LightGBM (which imports scikit-learn) is never loaded
    bad = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert bad == []
