"""Tonight's sweep: the harness CLI as a subprocess (the estimator never imports the harness or vLLM)."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from estimator.errors import EstimatorError
from estimator.nightly.spec import NightlySpec

# ---------------------------------------------------------------- the sweep


def profile_command(profile: str | None) -> list[str]:
    """The harness CLI: `profile` given, else the one beside this Python (the venv's), else `python -m harness.cli`."""
    if profile:
        return shlex.split(profile)
    beside = Path(sys.executable).with_name("profile")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return [sys.executable, "-m", "harness.cli"]


@dataclass
class SweepOutcome:
    command: list[str]
    returncode: int
    seconds: float
    run_dir: Path


def run_sweep(spec: NightlySpec, run_id: str, say: Callable[[str], None], env: Mapping[str, str] | None = None,
              log: Path | None = None) -> SweepOutcome:
    """`profile sweep --spec SPEC --out STATE/runs --name RUN_ID --quiet [extra args] --canary`, in `env` (default:
    this process's), its output passed through or written to `log`. Every nightly sweep times the CPU canary: the
    history keeps it, and interleaved rounds normalize by it."""
    if not spec.spec.is_file():
        raise EstimatorError(f"nightly sweep spec {spec.spec} not found")
    runs_dir = spec.state_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        *profile_command(spec.profile),
        "sweep",
        "--spec",
        str(spec.spec),
        "--out",
        str(runs_dir),
        "--name",
        run_id,
        "--quiet",
        *spec.profile_args,
        "--canary",
    ]
    say("sweep: " + " ".join(shlex.quote(c) for c in cmd))
    t0 = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(log.open("w")) if log is not None else None
            proc = subprocess.run(cmd, env=None if env is None else dict(env), stdout=out,
                                  stderr=subprocess.STDOUT if out else None, timeout=spec.sweep_timeout_s,
                                  check=False)
        rc = proc.returncode
    except FileNotFoundError as exc:
        raise EstimatorError(f"cannot run the harness ({cmd[0]}): {exc}") from exc
    except subprocess.TimeoutExpired:
        rc = 124
    return SweepOutcome(cmd, rc, time.perf_counter() - t0, runs_dir / run_id)
