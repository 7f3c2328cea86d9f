"""Harness fixtures. `served_run` runs one small real CPU sweep (one engine start) as a user would, keeping its
output: the tests of what reaches the terminal, the request order and the effective engine config share it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_profile

# one engine config, 3 lengths x 2 sampling configs, 2 distinct prompts + 1 repeat, 3 tokens each
SERVED_SWEEP = ["--tier", "0", "--blocks", "32", "--text-tokens", "32,64,96", "--top-k", "0,50", "--reps", "2",
                "--same-prompt-repeats", "1", "--max-new-tokens", "3", "--warmup", "2", "--quiet"]


@pytest.fixture(scope="session")
def served_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """(the finished `profile sweep` process, its run folder)."""
    out = tmp_path_factory.mktemp("served")
    proc = run_profile("sweep", *SERVED_SWEEP, "--out", str(out), "--name", "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out / "run"
