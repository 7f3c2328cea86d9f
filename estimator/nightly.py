"""The nightly job: sweep a committed spec, train, compare against the accepted baseline run, flag regressions.

One night (`run_nightly`):
1. run `profile sweep --spec SPEC --out STATE/runs --name nightly-<UTC time>` as a subprocess (the estimator never
   imports the harness or vLLM); or take an existing run folder (`run=`);
2. train the estimator on it (`STATE/models/<run_id>`, LightGBM text models + meta.json with held-out metrics);
3. compare it with the baseline (`STATE/baseline.json`, the last accepted night, or `baseline=RUN`):
   - latency, per config (the manifest's spec axes except text_tokens: tier, top_k, blocks, ...) and phase: the
     ratio tonight / baseline of the median latency per request (prefill: the request's prefill step; decode: the
     median of its decode steps), taken per text_tokens value and combined as a geometric mean over the values
     both runs have. A 95% bootstrap CI (requests resampled within each text_tokens value, each run on its own)
     gives the runs' own repeat spread; the config and phase are flagged when the whole CI lies above
     1 + tolerance (5%) and a second sweep, made only when something is flagged, repeats the flag (each config is
     measured for a few seconds, so a burst of other work on the machine can shift its whole window);
   - the estimator: held-out (by prompt) MAPE per phase from tonight's meta.json against the baseline's; flagged
     when it grew by more than 25% relative and by more than 1 percentage point;
4. write the summary JSON (`STATE/summaries/<run_id>.json`, copied to `STATE/latest.json`), append one line to
   `STATE/history.jsonl`, promote tonight to baseline when asked (`accept`) or when there was none (first night),
   and write the report with the trend over nights (`STATE/reports/<run_id>/report.html`).

Exit codes (`NightlyResult.exit_code`): 0 no regression, 1 regression flagged, 3 the sweep failed or left failed
points (the CLI adds 2 for bad input and 4 for a crash of the job itself).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from estimator.dataset import PHASES, RunSet, load_runs
from estimator.errors import EstimatorError
from estimator.features import Variant, key_part

DEFAULT_SPEC = Path("scripts/nightly_spec.toml")
DEFAULT_STATE_DIR = Path("nightly")
BASELINE_FILE = "baseline.json"
HISTORY_FILE = "history.jsonl"
LATEST_FILE = "latest.json"
SUMMARY_SCHEMA = "nightly-summary/1"
EXIT_OK, EXIT_REGRESSION, EXIT_SWEEP_FAILED = 0, 1, 3


class NightlySpec(BaseModel):
    """What one night does; defaults are the committed nightly (see docs/nightly.md)."""

    model_config = ConfigDict(extra="forbid")

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


# ---------------------------------------------------------------- latency regression check


@dataclass(frozen=True)
class RatioCI:
    """Ratio tonight / baseline of the median latency (geometric mean over strata) and its bootstrap CI."""

    ratio: float
    low: float
    high: float
    strata: int


def _median_rows(matrix: np.ndarray) -> np.ndarray:
    return np.median(matrix, axis=1)


def bootstrap_ratio(
    baseline: Sequence[np.ndarray],
    tonight: Sequence[np.ndarray],
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> RatioCI:
    """Median-ratio tonight / baseline with a percentile bootstrap CI.

    `baseline[i]` and `tonight[i]` are the per-request latencies (ms) of stratum i (one text_tokens value). The
    statistic is exp(mean_i log(median(tonight[i]) / median(baseline[i]))); each bootstrap replicate resamples
    the requests of every stratum of each run independently, with replacement.
    """
    pairs = [
        (np.asarray(b, dtype=np.float64), np.asarray(t, dtype=np.float64))
        for b, t in zip(baseline, tonight, strict=True)
        if len(b) and len(t)
    ]
    if not pairs:
        raise EstimatorError("no stratum has requests in both runs")
    for b, t in pairs:
        if (b <= 0).any() or (t <= 0).any():
            raise EstimatorError("latencies must be positive")
    rng = np.random.default_rng(seed)
    point = float(np.exp(np.mean([np.log(np.median(t) / np.median(b)) for b, t in pairs])))
    logs = np.zeros(n_boot)
    for b, t in pairs:
        mb = _median_rows(b[rng.integers(0, len(b), size=(n_boot, len(b)))])
        mt = _median_rows(t[rng.integers(0, len(t), size=(n_boot, len(t)))])
        logs += np.log(mt / mb)
    stats = np.exp(logs / len(pairs))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return RatioCI(ratio=point, low=float(low), high=float(high), strata=len(pairs))


def is_regression(ci: RatioCI, tolerance: float) -> bool:
    """Slower beyond noise: the whole CI of tonight / baseline lies above 1 + tolerance."""
    return ci.low > 1.0 + tolerance


def is_improvement(ci: RatioCI, tolerance: float) -> bool:
    """Faster beyond noise: the whole CI lies below 1 - tolerance (reported, never an error)."""
    return ci.high < 1.0 - tolerance


def request_latencies(samples: pd.DataFrame, phase: str, config_columns: Sequence[str]) -> pd.DataFrame:
    """One row per request: config columns, text_tokens and `latency_ms` (prefill: its prefill step; decode: the
    median of its decode steps)."""
    rows = samples[samples["phase"] == phase]
    keys = ["run_id", "point_id", "rep"] if "rep" in rows.columns else ["run_id", "point_id", "prompt_id"]
    cols = [*config_columns, "text_tokens"]
    agg: dict[str, tuple[str, str]] = {c: (c, "first") for c in cols}
    agg["latency_ms"] = ("latency_ms", "median")
    if "model" in rows.columns and "model" not in cols:
        agg["model"] = ("model", "first")
    out: pd.DataFrame = rows.groupby(keys, sort=False).agg(**agg).reset_index()
    return out


@dataclass
class ConfigCheck:
    """Tonight vs baseline for one config and phase."""

    config: dict[str, Any]
    label: str
    phase: str
    baseline_median_ms: float
    tonight_median_ms: float
    ratio: float
    ci: tuple[float, float]
    requests: str
    text_tokens: list[int]
    models: dict[str, list[str]]
    flagged: bool
    improved: bool
    confirm: dict[str, Any] | None = None  # the re-run's ratio, CI and flag, when one was made

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"] = list(self.ci)
        return d


def apply_confirmation(checks: Sequence[ConfigCheck], rerun: Sequence[ConfigCheck]) -> None:
    """Keep a latency flag only where the re-run flags the same config and phase too.

    Each config is measured for a few seconds per night, so a burst of other work on the machine can shift one
    config's whole window beyond its repeat spread; a second, independent window rules that out.
    """
    again = {(c.label, c.phase): c for c in rerun}
    for c in checks:
        if not c.flagged:
            continue
        r = again.get((c.label, c.phase))
        c.confirm = (
            {"ratio": r.ratio, "ci": list(r.ci), "flagged": r.flagged, "tonight_median_ms": r.tonight_median_ms}
            if r is not None
            else {"ratio": None, "ci": None, "flagged": False, "tonight_median_ms": None}
        )
        c.flagged = r is not None and r.flagged


def config_label(config: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={key_part(v)}" for k, v in config.items())


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _by_config(frame: pd.DataFrame, axes: Sequence[str]) -> dict[tuple[str, ...], pd.DataFrame]:
    if not axes:
        return {(): frame}
    out: dict[tuple[str, ...], pd.DataFrame] = {}
    for key, g in frame.groupby(list(axes), sort=True):
        values = key if isinstance(key, tuple) else (key,)
        out[tuple(key_part(v) for v in values)] = g
    return out


def compare_latency(
    baseline: RunSet,
    tonight: RunSet,
    axes: Sequence[str],
    tolerance: float = 0.05,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[list[ConfigCheck], list[str]]:
    """Per config (values of `axes`) and phase: median ratio tonight / baseline, its CI, and the flag.

    Returns the checks and warnings (configs or text_tokens values only one run has).
    """
    warnings: list[str] = []
    checks: list[ConfigCheck] = []
    axes = list(axes)
    for phase in PHASES:
        b = request_latencies(baseline.samples, phase, axes)
        t = request_latencies(tonight.samples, phase, axes)
        b_groups, t_groups = _by_config(b, axes), _by_config(t, axes)
        for key in sorted(set(b_groups) - set(t_groups)):
            if phase == "prefill":
                warnings.append(
                    f"config {config_label(dict(zip(axes, key, strict=True)))} is in the baseline "
                    "but not in tonight's run"
                )
        for key in sorted(set(t_groups) - set(b_groups)):
            if phase == "prefill":
                warnings.append(
                    f"config {config_label(dict(zip(axes, key, strict=True)))} is new tonight (no "
                    "baseline to compare with)"
                )
        for key in sorted(set(b_groups) & set(t_groups)):
            bg, tg = b_groups[key], t_groups[key]
            config = {a: _plain(bg[a].iloc[0]) for a in axes}
            common = sorted(set(bg["text_tokens"]) & set(tg["text_tokens"]))
            only = sorted(set(bg["text_tokens"]) ^ set(tg["text_tokens"]))
            if only and phase == "prefill":
                warnings.append(f"config {config_label(config)}: text_tokens {only} only in one run (left out)")
            if not common:
                continue
            bs = [bg.loc[bg["text_tokens"] == n, "latency_ms"].to_numpy() for n in common]
            ts = [tg.loc[tg["text_tokens"] == n, "latency_ms"].to_numpy() for n in common]
            ci = bootstrap_ratio(bs, ts, n_boot, confidence, seed)
            used_b = bg[bg["text_tokens"].isin(common)]
            used_t = tg[tg["text_tokens"].isin(common)]
            models = {
                "baseline": sorted({str(m) for m in used_b["model"]}) if "model" in used_b else [],
                "tonight": sorted({str(m) for m in used_t["model"]}) if "model" in used_t else [],
            }
            checks.append(
                ConfigCheck(
                    config=config,
                    label=config_label(config),
                    phase=phase,
                    baseline_median_ms=float(used_b["latency_ms"].median()),
                    tonight_median_ms=float(used_t["latency_ms"].median()),
                    ratio=ci.ratio,
                    ci=(ci.low, ci.high),
                    requests=f"{len(used_b)}/{len(used_t)}",
                    text_tokens=[int(n) for n in common],
                    models=models,
                    flagged=is_regression(ci, tolerance),
                    improved=is_improvement(ci, tolerance),
                )
            )
    return checks, warnings


def config_medians(runset: RunSet, axes: Sequence[str]) -> list[dict[str, Any]]:
    """Median per-request latency (ms) per config and phase: the points of the trend plot."""
    out = []
    for phase in PHASES:
        req = request_latencies(runset.samples, phase, axes)
        groups = req.groupby(list(axes), sort=True) if axes else [((), req)]
        for key, g in groups:
            values = key if isinstance(key, tuple) else (key,)
            config = {a: _plain(v) for a, v in zip(axes, values, strict=True)}
            out.append(
                {
                    "config": config,
                    "label": config_label(config),
                    "phase": phase,
                    "median_ms": float(g["latency_ms"].median()),
                    "requests": len(g),
                }
            )
    return out


# ---------------------------------------------------------------- measuring conditions

# Telemetry snapshot columns (per step) whose medians describe the conditions a run measured under.
CONDITION_COLUMNS = (
    "tel_load_avg_1m",
    "tel_cpu_util_pct",
    "tel_cpu_freq_mhz",
    "tel_sm_clock_mhz",
    "tel_temp_c",
    "tel_power_w",
)
LOAD_DIFF_WARN = 0.5  # load-average difference (runnable processes; a quarter of a 2-core box) worth a warning
CLOCK_DIFF_WARN = 0.05  # relative SM-clock / CPU-frequency difference worth a warning


def run_conditions(runset: RunSet) -> dict[str, float | None]:
    """Medians of the per-step telemetry snapshot (load average, clocks, temperature, ...) and the share of
    throttled steps: what the machine was doing while the run measured."""
    s = runset.samples
    out: dict[str, float | None] = {}
    for c in CONDITION_COLUMNS:
        if c in s.columns:
            v = pd.to_numeric(s[c], errors="coerce").median()
            out[c.removeprefix("tel_")] = float(v) if pd.notna(v) else None
    if "throttled" in s.columns:
        out["throttled_share"] = float(s["throttled"].astype(bool).mean())
    return out


def condition_warnings(baseline: Mapping[str, float | None], tonight: Mapping[str, float | None]) -> list[str]:
    """Differences in measuring conditions large enough to explain part of a latency change."""
    out = []
    b, t = baseline.get("load_avg_1m"), tonight.get("load_avg_1m")
    if b is not None and t is not None and abs(t - b) >= LOAD_DIFF_WARN:
        out.append(
            f"the machine was busier {'in the baseline run' if b > t else 'tonight'}: load average {b:.1f} "
            f"(baseline) vs {t:.1f} (tonight); other processes may explain part of any difference"
        )
    for key, what in (("sm_clock_mhz", "SM clock"), ("cpu_freq_mhz", "CPU frequency")):
        b, t = baseline.get(key), tonight.get(key)
        if b and t and abs(t - b) / b > CLOCK_DIFF_WARN:
            out.append(f"median {what} differs: {b:.0f} MHz (baseline) vs {t:.0f} MHz (tonight)")
    share = tonight.get("throttled_share")
    if share:
        out.append(f"{share:.0%} of tonight's steps ran throttled (a clock-event reason other than idle)")
    return out


# ---------------------------------------------------------------- estimator check


@dataclass
class MapeCheck:
    phase: str
    baseline_mape_pct: float | None
    tonight_mape_pct: float | None
    growth_pct: float | None
    flagged: bool


def compare_mape(
    baseline: Mapping[str, float | None],
    tonight: Mapping[str, float | None],
    growth: float = 0.25,
    min_points: float = 1.0,
) -> list[MapeCheck]:
    """Held-out MAPE per phase, tonight vs baseline: flagged when it grew by > `growth` (relative) AND by more than
    `min_points` percentage points (small data sets move MAPE by a point or so from night to night)."""
    out = []
    for phase in PHASES:
        b, t = baseline.get(phase), tonight.get(phase)
        if b is None or t is None or not (math.isfinite(b) and math.isfinite(t)) or b <= 0:
            out.append(MapeCheck(phase, b, t, None, False))
            continue
        rel = (t - b) / b
        out.append(MapeCheck(phase, b, t, rel * 100.0, rel > growth and (t - b) > min_points))
    return out


def held_out_mape(model_dir: Path) -> dict[str, float | None]:
    """Held-out (by prompt) MAPE per phase from a model folder's meta.json (None where not recorded)."""
    path = model_dir / "meta.json"
    if not path.is_file():
        raise EstimatorError(f"{model_dir}: not a model folder (no meta.json)")
    meta = json.loads(path.read_text())
    held = meta.get("held_out") or {}
    metrics = held.get("metrics") or {}
    return {p: (metrics.get(p) or {}).get("mape_pct") for p in PHASES}


# ---------------------------------------------------------------- state: baseline, history


@dataclass
class Baseline:
    run_id: str
    run_path: str
    model_path: str | None
    held_out_mape_pct: dict[str, float | None]
    accepted_at: str
    note: str = ""


def read_baseline(state_dir: Path) -> Baseline | None:
    path = state_dir / BASELINE_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return Baseline(**raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise EstimatorError(f"{path}: unreadable baseline record ({exc})") from exc


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def append_history(state_dir: Path, line: Mapping[str, Any]) -> Path:
    path = state_dir / HISTORY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line, default=str) + "\n")
    return path


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


def run_sweep(spec: NightlySpec, run_id: str, say: Callable[[str], None]) -> SweepOutcome:
    """`profile sweep --spec SPEC --out STATE/runs --name RUN_ID --quiet [extra args]`, output passed through."""
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
    ]
    say("sweep: " + " ".join(shlex.quote(c) for c in cmd))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=spec.sweep_timeout_s, check=False)
        rc = proc.returncode
    except FileNotFoundError as exc:
        raise EstimatorError(f"cannot run the harness ({cmd[0]}): {exc}") from exc
    except subprocess.TimeoutExpired:
        rc = 124
    return SweepOutcome(cmd, rc, time.perf_counter() - t0, runs_dir / run_id)


# ---------------------------------------------------------------- one night


@dataclass
class NightlyResult:
    summary: dict[str, Any]
    summary_path: Path
    history_path: Path
    report_path: Path | None
    exit_code: int
    messages: list[str] = field(default_factory=list)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _train(run_dir: Path, out: Path, spec: NightlySpec) -> dict[str, float | None]:
    from estimator.train import TrainSpec, train

    train(TrainSpec(runs=[run_dir], out=out, variant=spec.variant, seed=spec.seed))
    return held_out_mape(out)


def _spec_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    sa, sb = a.get("spec") or {}, b.get("spec") or {}
    keys = sorted(set(sa) | set(sb))
    return [k for k in keys if json.dumps(sa.get(k), sort_keys=True) != json.dumps(sb.get(k), sort_keys=True)]


def _model_warnings(checks: Sequence[ConfigCheck]) -> list[str]:
    seen: set[str] = set()
    out = []
    for c in checks:
        if c.models["baseline"] != c.models["tonight"] and c.label not in seen:
            seen.add(c.label)
            out.append(
                f"config {c.label} ran {'/'.join(c.models['tonight'])} tonight but "
                f"{'/'.join(c.models['baseline'])} in the baseline (same labels, different model)"
            )
    return out


def rerun_confirm(
    spec: NightlySpec,
    run_id: str,
    baseline: RunSet,
    axes: Sequence[str],
    checks: list[ConfigCheck],
    warnings: list[str],
    say: Callable[[str], None],
) -> str | None:
    """Sweep the spec once more (`<run_id>-confirm`) and keep only the flags it repeats; returns its run id."""
    flagged = ", ".join(f"{c.label} {c.phase}" for c in checks if c.flagged)
    say(f"confirm: {flagged} flagged; measuring once more")
    outcome = run_sweep(spec, f"{run_id}-confirm", say)
    if outcome.returncode != 0 or not (outcome.run_dir / "samples").is_dir():
        warnings.append(f"the confirmation sweep failed (exit {outcome.returncode}); the flags stand unconfirmed")
        return None
    rerun = load_runs([outcome.run_dir])
    again, _ = compare_latency(baseline, rerun, axes, spec.tolerance, spec.confidence, spec.bootstrap, spec.seed)
    apply_confirmation(checks, again)
    dropped = [f"{c.label} {c.phase}" for c in checks if c.confirm and not c.flagged]
    if dropped:
        warnings.append(
            f"flagged at first but not on the re-run ({rerun.runs[0].run_id}): {', '.join(dropped)}: a transient "
            "disturbance, not a regression"
        )
    return rerun.runs[0].run_id


def new_run_id(runs_dir: Path, when: dt.datetime) -> str:
    """`nightly-YYYYmmdd-HHMMSS` (UTC), with a counter when that folder (or its re-run) already exists."""
    base = "nightly-" + when.strftime("%Y%m%d-%H%M%S")
    name, n = base, 1
    while (runs_dir / name).exists() or (runs_dir / f"{name}-confirm").exists():
        n += 1
        name = f"{base}-{n}"
    return name


def run_nightly(spec: NightlySpec, progress: Callable[[str], None] | None = None) -> NightlyResult:
    """One night: sweep (or take `spec.run`), train, check against the baseline, record, report."""
    say = progress or (lambda _msg: None)
    state = spec.state_dir
    state.mkdir(parents=True, exist_ok=True)
    started = _now()
    warnings: list[str] = []
    sweep_info: dict[str, Any] | None = None
    sweep_failed = False
    if spec.run is not None:
        run_dir = spec.run
        if not (run_dir / "manifest.json").is_file():
            raise EstimatorError(f"{run_dir}: not a run folder (no manifest.json)")
    else:
        outcome = run_sweep(spec, new_run_id(state / "runs", started), say)
        run_dir = outcome.run_dir
        sweep_info = {
            "command": outcome.command,
            "returncode": outcome.returncode,
            "seconds": round(outcome.seconds, 1),
        }
        if outcome.returncode != 0:
            sweep_failed = True
            warnings.append(
                f"the sweep exited with code {outcome.returncode} (1: some points failed, see "
                f"{run_dir}/failures.jsonl; 124: timed out)"
            )
        if not (run_dir / "samples").is_dir():
            raise EstimatorError(f"the sweep wrote no samples into {run_dir} (exit code {outcome.returncode})")
    tonight = load_runs([run_dir])
    run_id = tonight.runs[0].run_id
    if tonight.runs[0].status != "complete":
        sweep_failed = True
        warnings.append(f"tonight's run status is {tonight.runs[0].status!r}, not 'complete'")
    say(f"train: {run_id}")
    model_dir = state / "models" / run_id
    tonight_mape = _train(run_dir, model_dir, spec)

    # The baseline: named on the command line, else the accepted one.
    recorded = read_baseline(state)
    base: Baseline | None = None
    source = None
    if spec.baseline is not None:
        brun = load_runs([spec.baseline]).runs[0]
        if recorded is not None and recorded.run_id == brun.run_id and recorded.model_path:
            mape = recorded.held_out_mape_pct
            bmodel = recorded.model_path
        else:
            bmodel_dir = state / "models" / brun.run_id
            if not (bmodel_dir / "meta.json").is_file():
                say(f"train: baseline {brun.run_id}")
                _train(spec.baseline, bmodel_dir, spec)
            mape, bmodel = held_out_mape(bmodel_dir), str(bmodel_dir)
        base = Baseline(brun.run_id, str(spec.baseline), bmodel, mape, "", "named with --baseline")
        source = "--baseline"
    elif recorded is not None and not (Path(recorded.run_path) / "manifest.json").is_file():
        if not spec.accept:
            raise EstimatorError(
                f"the baseline run {recorded.run_path} named in {state / BASELINE_FILE} is gone: pass --baseline RUN, "
                "or --accept to start over from tonight"
            )
        warnings.append(f"the baseline run {recorded.run_path} is gone; tonight becomes the baseline (--accept)")
    elif recorded is not None:
        base, source = recorded, str(state / BASELINE_FILE)
    if base is not None and base.run_id == run_id:
        warnings.append(f"tonight's run {run_id} is the baseline itself; nothing to compare")
        base = None

    checks: list[ConfigCheck] = []
    mape_checks: list[MapeCheck] = []
    confirm_id: str | None = None
    conditions: dict[str, Any] = {"tonight": run_conditions(tonight)}
    tonight_axes = list(tonight.axes)
    axes = tonight_axes
    if base is not None:
        say(f"compare: {run_id} vs baseline {base.run_id}")
        baseline_set = load_runs([Path(base.run_path)])
        axes = [a for a in baseline_set.axes if a in tonight_axes]
        if set(axes) != set(baseline_set.axes) | set(tonight_axes):
            warnings.append(
                f"the runs sweep different axes ({baseline_set.axes} vs {tonight_axes}); compared on {axes}"
            )
        diff = _spec_differences(baseline_set.runs[0].manifest, tonight.runs[0].manifest)
        if diff:
            warnings.append(f"tonight's sweep spec differs from the baseline's in: {', '.join(diff)}")
        checks, more = compare_latency(
            baseline_set, tonight, axes, spec.tolerance, spec.confidence, spec.bootstrap, spec.seed
        )
        conditions["baseline"] = run_conditions(baseline_set)
        if spec.confirm and spec.run is None and any(c.flagged for c in checks):
            confirm_id = rerun_confirm(spec, run_id, baseline_set, axes, checks, warnings, say)
        warnings += more + _model_warnings(checks)
        warnings += condition_warnings(conditions["baseline"], conditions["tonight"])
        mape_checks = compare_mape(base.held_out_mape_pct, tonight_mape, spec.mape_growth, spec.mape_min_points)
    regression = any(c.flagged for c in checks) or any(m.flagged for m in mape_checks)
    first_night = base is None and recorded is None and spec.baseline is None
    accept = spec.accept or (first_night and not sweep_failed)
    messages = []
    if first_night:
        messages.append(
            f"no baseline yet: tonight's run {run_id} "
            + ("is accepted as the baseline" if accept else "is NOT accepted (the sweep failed)")
        )
    elif spec.accept:
        messages.append(f"--accept: tonight's run {run_id} becomes the baseline")
    improved = [f"{c.label} {c.phase}" for c in checks if c.improved]
    if improved and not spec.accept:
        messages.append(
            f"faster beyond noise: {', '.join(improved)}; if that is expected (or the baseline night was disturbed), "
            "promote tonight with --accept"
        )
    exit_code = EXIT_REGRESSION if regression else EXIT_SWEEP_FAILED if sweep_failed else EXIT_OK

    if spec.compare:
        from estimator.compare import CompareSpec, compare

        say(f"compare variants: {run_id}")
        try:
            compare(CompareSpec(runs=[run_dir], seed=spec.seed, cost_calls=20))
        except EstimatorError as exc:
            warnings.append(f"estimate compare failed: {exc}")

    report_dir = state / "reports" / run_id
    summary: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA,
        "night": started.isoformat(timespec="seconds"),
        "run_id": run_id,
        "run_path": str(run_dir),
        "model_path": str(model_dir),
        "report_path": str(report_dir / "report.html") if spec.report else None,
        "baseline_run_id": base.run_id if base else None,
        "baseline_run_path": base.run_path if base else None,
        "baseline_source": source,
        "confirm_run_id": confirm_id,
        "first_night": first_night,
        "accepted": accept,
        "regression": regression,
        "flagged": [f"{c.label} {c.phase}" for c in checks if c.flagged]
        + [f"estimator held-out MAPE {m.phase}" for m in mape_checks if m.flagged],
        "exit_code": exit_code,
        "rule": (
            f"latency: flag a config and phase when the {spec.confidence:.0%} bootstrap CI of median(tonight) / "
            f"median(baseline) per request lies entirely above {1 + spec.tolerance:.2f}"
            + (" in tonight's run and in a re-run" if spec.confirm else "")
            + "; estimator: flag when "
            f"held-out MAPE grew by more than {spec.mape_growth:.0%} relative and {spec.mape_min_points:g} points"
        ),
        "thresholds": {
            "tolerance": spec.tolerance,
            "confidence": spec.confidence,
            "bootstrap": spec.bootstrap,
            "mape_growth": spec.mape_growth,
            "mape_min_points": spec.mape_min_points,
        },
        "config_axes": axes,
        "comparisons": [c.as_dict() for c in checks],
        "estimator_checks": [asdict(m) for m in mape_checks],
        "held_out_mape_pct": tonight_mape,
        "conditions": conditions,
        "medians": config_medians(tonight, tonight_axes),
        "sweep": sweep_info,
        "warnings": warnings,
        "messages": list(messages),
    }
    summary_path = state / "summaries" / f"{run_id}.json"
    write_json_atomic(summary_path, summary)
    write_json_atomic(state / LATEST_FILE, summary)
    flagged_labels = {(c.label, c.phase) for c in checks if c.flagged}
    history_path = append_history(
        state,
        {
            "night": summary["night"],
            "run_id": run_id,
            "baseline_run_id": summary["baseline_run_id"],
            "regression": regression,
            "accepted": accept,
            "exit_code": exit_code,
            "flagged": summary["flagged"],
            "held_out_mape_pct": tonight_mape,
            "medians": [{**m, "flagged": (m["label"], m["phase"]) in flagged_labels} for m in summary["medians"]],
        },
    )
    if accept:
        write_json_atomic(
            state / BASELINE_FILE,
            asdict(
                Baseline(
                    run_id,
                    str(run_dir),
                    str(model_dir),
                    tonight_mape,
                    _now().isoformat(timespec="seconds"),
                    "first night" if first_night else "--accept",
                )
            ),
        )
    report_path = None
    if spec.report:
        say(f"report: {report_dir}")
        from estimator.report import ReportSpec, write_report

        try:
            files = write_report(
                ReportSpec(
                    runs=[run_dir],
                    model=model_dir,
                    out=report_dir,
                    history=history_path,
                    nightly_summary=summary_path,
                    title=f"Nightly latency report: {run_id}",
                )
            )
            report_path = files.html
            shutil.copyfile(summary_path, report_dir / "summary.json")
        except (EstimatorError, OSError, ValueError) as exc:
            messages.append(f"report failed: {exc}")
    return NightlyResult(summary, summary_path, history_path, report_path, exit_code, messages)


def format_result(result: NightlyResult) -> list[str]:
    """Human-readable lines: the verdict, one line per compared config and phase, warnings, paths."""
    s = result.summary
    lines = []
    verdict = "REGRESSION" if s["regression"] else "ok"
    base = s["baseline_run_id"] or "none"
    lines.append(f"nightly {s['run_id']} vs baseline {base}: {verdict} (exit {result.exit_code})")
    for c in s["comparisons"]:
        mark = "FLAGGED" if c["flagged"] else "improved" if c["improved"] else "ok"
        again = c.get("confirm")
        if again and again.get("ratio") is not None:
            mark += f" (re-run: ratio {again['ratio']:.3f}, CI {again['ci'][0]:.3f}-{again['ci'][1]:.3f})"
        lines.append(
            f"  {c['label']:<28} {c['phase']:<7} {c['baseline_median_ms']:9.2f} -> {c['tonight_median_ms']:9.2f} ms"
            f"  ratio {c['ratio']:.3f} (95% CI {c['ci'][0]:.3f}-{c['ci'][1]:.3f})  {mark}"
        )
    for m in s["estimator_checks"]:
        if m["growth_pct"] is not None:
            lines.append(
                f"  estimator held-out MAPE {m['phase']:<7} {m['baseline_mape_pct']:.2f}% -> "
                f"{m['tonight_mape_pct']:.2f}% ({m['growth_pct']:+.0f}%)  {'FLAGGED' if m['flagged'] else 'ok'}"
            )
    lines += [f"warning: {w}" for w in s["warnings"]]
    lines += result.messages
    lines.append(f"summary {result.summary_path}; history {result.history_path}")
    if result.report_path:
        lines.append(f"report {result.report_path}")
    return lines


if __name__ == "__main__":  # pragma: no cover
    import typer

    from estimator.cli_extra import nightly

    typer.run(nightly)
