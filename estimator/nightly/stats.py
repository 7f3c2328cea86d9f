"""The statistics that flag a regression: bootstrap CI of each config's latency ratio against the baseline, the
measuring conditions of both runs, and the estimator's held-out MAPE growth."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from estimator.data.runs import PHASES, RunSet
from estimator.errors import EstimatorError
from estimator.model.features import key_part
from estimator.study.nightly_results import ConfigComparison, ConfirmRun, MapeComparison

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


def apply_confirmation(checks: Sequence[ConfigComparison], rerun: Sequence[ConfigComparison]) -> None:
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
            ConfirmRun(ratio=r.ratio, ci=list(r.ci), flagged=r.flagged, tonight_median_ms=r.tonight_median_ms)
            if r is not None
            else ConfirmRun(ratio=None, ci=None, flagged=False, tonight_median_ms=None)
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
) -> tuple[list[ConfigComparison], list[str]]:
    """Per config (values of `axes`) and phase: median ratio tonight / baseline, its CI, and the flag.

    Returns the checks and warnings (configs or text_tokens values only one run has).
    """
    warnings: list[str] = []
    checks: list[ConfigComparison] = []
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
                ConfigComparison(
                    config=config,
                    label=config_label(config),
                    phase=phase,
                    baseline_median_ms=float(used_b["latency_ms"].median()),
                    tonight_median_ms=float(used_t["latency_ms"].median()),
                    ratio=ci.ratio,
                    ci=[ci.low, ci.high],
                    requests=f"{len(used_b)}/{len(used_t)}",
                    text_tokens=[int(n) for n in common],
                    models=models,
                    flagged=is_regression(ci, tolerance),
                    improved=is_improvement(ci, tolerance),
                )
            )
    return checks, warnings


def canary_ms(manifest: Mapping[str, Any]) -> dict[str, float | None]:
    """Per phase, the mean of a run manifest's CPU canary timings (ms per pass, `profile sweep --canary`: before and
    after; either alone if one failed; None without a canary)."""
    records = [r for r in (manifest.get("canary") or {}).values() if isinstance(r, dict) and "error" not in r]
    out: dict[str, float | None] = {}
    for phase in PHASES:
        values = [float(r[phase]["median_ms"]) for r in records if phase in r]
        out[phase] = float(np.mean(values)) if values else None
    return out


def config_medians(runset: RunSet, axes: Sequence[str]) -> list[dict[str, Any]]:
    """Median per-request latency (ms) per config and phase: the points of the trend plot; `canary_ms` is the run's
    canary for that phase (None without one), by which the history can be normalized."""
    canary = canary_ms(runset.runs[0].manifest) if len(runset.runs) == 1 else dict.fromkeys(PHASES)
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
                    "canary_ms": canary[phase],
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


def compare_mape(
    baseline: Mapping[str, float | None],
    tonight: Mapping[str, float | None],
    growth: float = 0.25,
    min_points: float = 1.0,
) -> list[MapeComparison]:
    """Held-out MAPE per phase, tonight vs baseline: flagged when it grew by > `growth` (relative) AND by more than
    `min_points` percentage points (small data sets move MAPE by a point or so from night to night)."""
    out = []
    for phase in PHASES:
        b, t = baseline.get(phase), tonight.get(phase)
        if b is None or t is None or not (math.isfinite(b) and math.isfinite(t)) or b <= 0:
            out.append(MapeComparison(phase=phase, baseline_mape_pct=b, tonight_mape_pct=t, growth_pct=None,
                                      flagged=False))
            continue
        rel = (t - b) / b
        out.append(MapeComparison(phase=phase, baseline_mape_pct=b, tonight_mape_pct=t, growth_pct=rel * 100.0,
                                  flagged=rel > growth and (t - b) > min_points))
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
