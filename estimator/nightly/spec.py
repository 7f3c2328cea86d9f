"""What one night does (`NightlySpec`), the state-folder file names and the job's exit codes."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from estimator.model.features import Variant
from estimator.strict import StrictModel

DEFAULT_SPEC = Path("scripts/nightly_spec.toml")
DEFAULT_STATE_DIR = Path("nightly")
BASELINE_FILE = "baseline.json"
HISTORY_FILE = "history.jsonl"
LATEST_FILE = "latest.json"
SUMMARY_SCHEMA = "nightly-summary/1"
EXIT_OK, EXIT_REGRESSION, EXIT_SWEEP_FAILED = 0, 1, 3


class NightlySpec(StrictModel):
    """What one night does; defaults are the committed nightly (see docs/nightly.md)."""

    spec: Path = DEFAULT_SPEC
    state_dir: Path = DEFAULT_STATE_DIR
    baseline: Path | None = Field(None, description="baseline run folder (default: the one in baseline.json)")
    accept: bool = Field(False, description="promote tonight's run to baseline")
    run: Path | None = Field(None, description="use this finished run instead of sweeping")
    profile: str | None = Field(None, description="command that runs the harness CLI (default: the venv's profile)")
    profile_args: list[str] = Field(default_factory=list, description="extra `profile sweep` arguments")
    tolerance: float = Field(0.05, ge=0.0, lt=1.0, description="flag when the CI lies above 1 + tolerance")
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples")
    mape_growth: float = Field(0.25, ge=0.0, description="flag held-out MAPE growing by more than this (relative)")
    mape_min_points: float = Field(1.0, ge=0.0, description="... and by more than this many percentage points")
    seed: int = 0
    variant: Variant = "tokens"
    compare: bool = Field(False, description="also run Experiment 2 (`estimate compare`) for the report")
    report: bool = True
    confirm: bool = Field(
        True, description="when a config is flagged, sweep once more and keep only the flags the re-run repeats"
    )
    sweep_timeout_s: float = Field(4 * 3600, gt=0)
    interleave: int = Field(
        0,
        ge=0,
        le=20,
        description="rounds of an interleaved night: the accepted settings and tonight's alternate in random order, "
        "each a fresh engine start timed with the CPU canary; the paired rounds decide (0: one sweep)",
    )
    control_k: float = Field(
        3.0, gt=0.0, description="flag only beyond centre × exp(k · between-night spread) of the accepted nights"
    )
    min_history: int = Field(4, ge=2, description="accepted nights before a config's own spread is used")
    default_spread: float = Field(
        0.05, gt=0.0, lt=1.0, description="between-night spread assumed while the history is short"
    )
