"""Telemetry timeline: step latency and the counters over each run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from estimator.data.runs import RunInfo, RunSet
from estimator.report.document import (
    FIGURE_PREFIX,
    SECTIONS,
    Figure,
    Note,
    Section,
    Table,
)
from estimator.report.plots import (
    fmt,
    legend,
    log_ticks,
    new_figure,
    png_bytes,
    style_axes,
)

# ---------------------------------------------------------------- telemetry

MAX_TELEMETRY_RUNS = 4
THROTTLE_IGNORED_BITS = 0x1  # NVML "GPU idle" is not throttling (the harness's definition, results schema)

# counter → (axis label, scale to display unit)
_TEL_PANELS: dict[str, tuple[str, float]] = {
    "sm_clock_mhz": ("SM clock (MHz)", 1.0),
    "mem_clock_mhz": ("memory clock (MHz)", 1.0),
    "power_w": ("power (W)", 1.0),
    "temp_c": ("temperature (°C)", 1.0),
    "gpu_util_pct": ("GPU utilization (%)", 1.0),
    "cpu_freq_mhz": ("CPU frequency (MHz)", 1.0),
    "cpu_util_pct": ("CPU utilization (%)", 1.0),
    "rss_mb": ("RSS, harness + engine (MB)", 1.0),
    "load_avg_1m": ("load average, 1 min", 1.0),
}


def throttled_spans(tel: pd.DataFrame, t0: float) -> list[tuple[float, float]]:
    """[start, end) spans (s since t0) where a clock-event reason other than GPU idle is set."""
    if "throttle_reasons" not in tel.columns or tel.empty:
        return []
    bits = pd.to_numeric(tel["throttle_reasons"], errors="coerce").fillna(0).astype("int64").to_numpy()
    flag = (bits & ~THROTTLE_IGNORED_BITS) != 0
    t = tel["t_s"].to_numpy(dtype=np.float64) - t0
    spans: list[tuple[float, float]] = []
    start: float | None = None
    for i, on in enumerate(flag):
        if on and start is None:
            start = t[i]
        elif not on and start is not None:
            spans.append((start, t[i]))
            start = None
    if start is not None:
        spans.append((start, t[-1]))
    return spans


def _with_gaps(t: np.ndarray, y: np.ndarray, gap_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Insert NaN where consecutive samples are more than gap_s apart, so lines break at idle gaps."""
    if len(t) < 2:
        return t, y
    breaks = np.flatnonzero(np.diff(t) > gap_s) + 1
    return np.insert(t, breaks, np.nan), np.insert(y.astype(np.float64), breaks, np.nan)


@dataclass(frozen=True)
class TimeAxis:
    """Run time (s since the first sample) → plotted time, with idle gaps longer than `max_gap_s` (engine starts,
    set-up between engine configs) shortened to `shown_gap_s` each, so that the measured stretches stay readable."""

    real: np.ndarray  # knots, s since t0
    shown: np.ndarray
    gaps: list[tuple[float, float]]  # (plotted start, real length s) of each collapsed gap
    shown_gap_s: float

    @classmethod
    def build(cls, times: np.ndarray, max_gap_s: float = 5.0) -> TimeAxis:
        t = np.unique(times[np.isfinite(times)])
        if len(t) < 2:
            return cls(np.array([0.0, 1.0]), np.array([0.0, 1.0]), [], 0.0)
        d = np.diff(t)
        big = np.flatnonzero(d > max_gap_s)
        measured = float(t[-1] - t[0] - d[big].sum())
        shown_gap = max(0.03 * measured, 0.2)
        real, shown, gaps = [float(t[0])], [float(t[0])], []
        for i in big:
            a, b = float(t[i]), float(t[i + 1])
            real += [a, b]
            shown += [shown[-1] + (a - real[-3]), 0.0]
            shown[-1] = shown[-2] + shown_gap
            gaps.append((shown[-2], b - a))
        real.append(float(t[-1]))
        shown.append(shown[-1] + (real[-1] - real[-2]))
        return cls(np.asarray(real), np.asarray(shown), gaps, shown_gap)

    def __call__(self, x: Any) -> np.ndarray:
        return np.interp(np.asarray(x, dtype=np.float64), self.real, self.shown)


def telemetry_figure(run: RunInfo, tel: pd.DataFrame, samples: pd.DataFrame) -> tuple[Any, list[list[str]], str]:
    """Stacked panels over run time: step latency, then each counter the source recorded; throttled spans shaded.

    Idle gaps longer than 5 s are collapsed (grey bands labelled with their real length)."""
    has_steps = "t_start_s" in samples.columns and samples["t_start_s"].notna().any()
    t0 = float(tel["t_s"].min())
    if has_steps:
        t0 = min(t0, float(samples["t_start_s"].min()))
    t = tel["t_s"].to_numpy(dtype=np.float64) - t0
    step_t = samples["t_start_s"].to_numpy(dtype=np.float64) - t0 if has_steps else np.zeros(0)
    axis = TimeAxis.build(np.concatenate([t, step_t]))
    counters = [c for c in _TEL_PANELS if c in tel.columns and pd.to_numeric(tel[c], errors="coerce").notna().any()]
    n_panels = 1 + len(counters)
    fig = new_figure(13, 1.3 + 1.55 * n_panels)
    axes = np.atleast_1d(fig.subplots(n_panels, 1, sharex=True))
    spans = throttled_spans(tel, t0)
    interval = float(np.median(np.diff(tel["t_s"].to_numpy()))) if len(tel) > 2 else 0.025
    line_gap = max(1.0, 40 * interval)
    ax0 = axes[0]
    if has_steps:
        for phase, color, size in (("decode", "#7f7f7f", 2), ("prefill", "#d62728", 8)):
            sub = samples[samples["phase"] == phase]
            ax0.scatter(
                axis(sub["t_start_s"] - t0),
                sub["latency_ms"],
                s=size,
                color=color,
                alpha=0.5,
                edgecolors="none",
                rasterized=True,
                label=f"{phase} steps",
            )
        ax0.set_yscale("log")
        log_ticks(ax0, "y", subs=(1.0,))
        ax0.set_ylabel("step latency\n(ms, log)", fontsize=9)
        if "engine_config_id" in samples.columns:
            starts = samples.groupby("engine_config_id", sort=False)["t_start_s"].min().sort_values()
            names = samples.drop_duplicates("engine_config_id").set_index("engine_config_id")
            for cid, ts in starts.items():
                x = float(axis(ts - t0))
                for ax in axes:
                    ax.axvline(x, color="#9467bd", linestyle=":", linewidth=1)
                row = names.loc[cid]
                text = " ".join(str(row[c]) for c in ("model", "blocks") if c in names.columns)
                ax0.annotate(
                    text,
                    (x, 1.0),
                    xycoords=("data", "axes fraction"),
                    fontsize=7,
                    color="#9467bd",
                    va="bottom",
                    ha="left",
                )
    stats: list[list[str]] = []
    for ax, col in zip(axes[1:], counters, strict=True):
        label, scale = _TEL_PANELS[col]
        y = pd.to_numeric(tel[col], errors="coerce").to_numpy(dtype=np.float64) * scale
        tt, yy = _with_gaps(t, y, line_gap)
        ax.plot(axis(tt), yy, linewidth=0.8, color="#1f77b4")
        ax.set_ylabel(label.replace(" (", "\n("), fontsize=9)
        ok = y[np.isfinite(y)]
        stats.append([label, fmt(np.min(ok), 1), fmt(np.median(ok), 1), fmt(np.max(ok), 1)])
    for ax in axes:
        for i, (a, b) in enumerate(spans):
            span_label = "throttled (clock-event reason other than idle)" if ax is ax0 and i == 0 else None
            ax.axvspan(float(axis(a)), float(axis(b)), color="#d62728", alpha=0.18, linewidth=0, label=span_label)
        for x, _real in axis.gaps:
            ax.axvspan(x, x + axis.shown_gap_s, color="#bbbbbb", alpha=0.35, linewidth=0)
        style_axes(ax)
    for x, real in axis.gaps:
        ax0.annotate(
            f"+{real:.0f} s",
            (x + axis.shown_gap_s / 2, 0.02),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color="#555555",
            ha="center",
            va="bottom",
        )
    if ax0.has_data():
        legend(ax0, fontsize=8, loc="upper left", frameon=False, markerscale=2, ncol=3)
    axes[-1].set_xlabel(
        "measuring time (s since the run's first sample, idle gaps > 5 s collapsed into the grey bands)"
        if axis.gaps
        else "time since the run's first sample (s, perf_counter clock)"
    )
    total = float(t.max() - t.min()) if len(t) else 0.0
    thr = sum(b - a for a, b in spans)
    note = (
        f"Throttled (a clock-event reason other than GPU idle) for {thr:.1f} s of {total:.0f} s (red spans)."
        if "throttle_reasons" in tel.columns
        else "Host counters: no GPU throttle reasons in this source."
    )
    if axis.gaps:
        note += (
            f" Grey bands: idle gaps (engine starts, set-up) of {', '.join(f'{g:.0f}' for _, g in axis.gaps)} s, "
            "drawn short; the time axis counts only the time in between."
        )
    return fig, stats, note


def telemetry_section(runset: RunSet, telemetry: Mapping[str, pd.DataFrame]) -> Section:
    """One timeline per run (the first MAX_TELEMETRY_RUNS); `telemetry` maps run_id to its telemetry samples."""
    sec = Section("telemetry", SECTIONS["telemetry"])
    for run in runset.runs[:MAX_TELEMETRY_RUNS]:
        tel = telemetry.get(run.run_id, pd.DataFrame())
        if tel.empty:
            sec.add(
                Note(
                    f"Run {run.run_id} has no telemetry/ files (swept with telemetry off, or killed before the "
                    "first point finished)."
                )
            )
            continue
        samples = runset.samples[runset.samples["run_id"] == run.run_id]
        fig, stats, note = telemetry_figure(run, tel, samples)
        source = ", ".join(sorted({str(s) for s in tel["source"].dropna().unique()})) if "source" in tel else "?"
        sec.add(
            Figure(
                f"{FIGURE_PREFIX}telemetry-{len(sec.figures) + 1}",
                png_bytes(fig),
                f"Run {run.run_id}, telemetry source `{source}` ({len(tel)} samples): engine step latency "
                "and counters over the run. Purple dotted lines: the first timed step after each engine start "
                f"(labelled model and block size); nothing is sampled between points. {note}",
            )
        )
        sec.add(Table(["counter", "min", "median", "max"], stats, f"Run {run.run_id}: telemetry ranges."))
    if len(runset.runs) > MAX_TELEMETRY_RUNS:
        sec.add(Note(f"Telemetry shown for the first {MAX_TELEMETRY_RUNS} of {len(runset.runs)} runs."))
    return sec
