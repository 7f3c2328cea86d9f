"""Shared fixtures. `small_run` runs one small real sweep on the CPU vLLM engine per test session.

scripts/test.sh runs the suite in two phases: the tests marked `alone` with the machine to themselves, the rest two
at a time (pytest-xdist). Every test that reads `small_run` is `alone`: its real run's figures are compared (the
nightly's same-config check, the estimator trained on it), so it must not be measured beside another engine, and
one phase builds it once."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]

# 2 engine configs (one model, two block sizes), 3 lengths, 8 decode positions, noise-floor repeats.
SMALL_SWEEP = ["--tier", "0", "--blocks", "32,64", "--text-tokens", "64,256,1024", "--top-k", "0",
               "--reps", "4", "--same-prompt-repeats", "3", "--max-new-tokens", "9", "--warmup", "2", "--quiet"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "small_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.alone)


def run_profile(*args: str, timeout: float = 900, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `profile` CLI as a user would (a separate process), capturing its output."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)



def load_script(name: str) -> ModuleType:
    """A script of scripts/ (not a package) loaded by path, e.g. load_script("check_layout")."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run folder from a small real CPU sweep."""
    out = tmp_path_factory.mktemp("results")
    proc = run_profile("sweep", *SMALL_SWEEP, "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [p for p in out.iterdir() if (p / "manifest.json").is_file()]
    assert len(runs) == 1
    return runs[0]
