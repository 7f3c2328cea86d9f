"""The run report: one self-contained HTML page (PNG figures inlined as base64, no external CSS/JS) and a
Markdown twin (figures as PNG files next to it).

Sections (in page order, keys in `SECTIONS`): at a glance, run manifest, latency vs prompt length and KV position
(with the closed-form fit per tier), Experiment 1 (CV per text_tokens vs the noise floor), predicted vs measured
for a chosen model, Experiment 2 (error per variant, from `<run>/compare/compare.json`), telemetry timeline,
LightGBM feature importance, and, for the nightly job, the trend over nights. A missing input (no model, no
compare/, no telemetry) turns its section into a note that says what to run; the page is always written.

Figures are drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import field_validator

from estimator.analyze import CV_INSUFFICIENT_PCT, CV_SUFFICIENT_PCT, analyze_runs, noise_floor
from estimator.dataset import PHASES, RunInfo, RunSet, RunsSpec, load_runs, read_parquet_folder
from estimator.errors import EstimatorError
from estimator.evaluate import ClosedForm, error_metrics

SECTIONS: dict[str, str] = {
    "glance": "At a glance",
    "manifest": "Run manifest",
    "latency": "Latency vs prompt length and KV position",
    "spread": "Experiment 1: latency spread at equal token count",
    "accuracy": "Predicted vs measured",
    "variants": "Experiment 2: error per feature variant",
    "telemetry": "Telemetry timeline",
    "importance": "Feature importance",
    "nightly": "Nightly trend",
}  # page order, except that the nightly section (only with a history or summary) comes right after the glance
HTML_NAME, MARKDOWN_NAME = "report.html", "report.md"
FIGURE_PREFIX = "fig-"
MAX_TELEMETRY_RUNS = 4
MAX_TEXT_TOKEN_BINS = 12
THROTTLE_IGNORED_BITS = 0x1  # NVML "GPU idle" is not throttling (the harness's definition, results schema)
_DPI = 100
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


# ---------------------------------------------------------------- spec and document model


class ReportSpec(RunsSpec):
    """What `estimate report` does: which runs, which model (optional), where the page goes.

    `history` (nightly JSONL) and `nightly_summary` (tonight's summary JSON) add the nightly section.
    """

    out: Path
    model: Path | None = None
    history: Path | None = None
    nightly_summary: Path | None = None
    title: str | None = None

    @field_validator("model")
    @classmethod
    def _model_exists(cls, model: Path | None) -> Path | None:
        if model is not None and not (model / "meta.json").is_file():
            raise ValueError(f"{model} is not a model folder (no meta.json; write one with `estimate train`)")
        return model


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Note:
    """A callout: something missing (and what to run) or a caveat."""

    text: str


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    name: str
    png: bytes
    caption: str


Block = Paragraph | Bullets | Note | Table | Figure


@dataclass
class Section:
    key: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, block: Block) -> None:
        self.blocks.append(block)

    @property
    def figures(self) -> list[Figure]:
        return [b for b in self.blocks if isinstance(b, Figure)]


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    images: list[Path]


@dataclass
class Report:
    """The document: title, subtitle and sections; `write` renders the HTML page and the Markdown twin."""

    title: str
    subtitle: str
    sections: list[Section]
    missing: list[str] = field(default_factory=list)

    @property
    def figures(self) -> list[Figure]:
        return [f for s in self.sections for f in s.figures]

    def write(self, out: Path) -> ReportFiles:
        """Write report.html (self-contained), report.md and the figures as PNG files into `out`."""
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(f"{FIGURE_PREFIX}*.png"):
            stale.unlink()
        images = []
        for fig in self.figures:
            path = out / f"{fig.name}.png"
            path.write_bytes(fig.png)
            images.append(path)
        html_path, md_path = out / HTML_NAME, out / MARKDOWN_NAME
        html_path.write_text(render_html(self), encoding="utf-8")
        md_path.write_text(render_markdown(self), encoding="utf-8")
        return ReportFiles(html=html_path, markdown=md_path, images=images)


# ---------------------------------------------------------------- small helpers


def _f(v: Any, digits: int = 2) -> str:
    """A number for a table cell: fixed digits, '–' for missing."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "–" if v is None else str(v)
    if not math.isfinite(x):
        return "–"
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _g(v: float, digits: int = 3) -> str:
    """A coefficient: significant digits, scientific notation for tiny values."""
    if not math.isfinite(v):
        return "–"
    return f"{v:.{digits}g}"


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _figure(width_in: float, height_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _style(ax: Any) -> None:
    ax.grid(True, which="major", alpha=0.3, linewidth=0.6)
    ax.tick_params(labelsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _log_ticks(ax: Any, which: str = "both", subs: tuple[float, ...] = (1.0, 2.0, 5.0)) -> None:
    """Log axes labelled with plain numbers at `subs` × 10^k (not 10^1 or 2×10^0)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes = {"x": [ax.xaxis], "y": [ax.yaxis], "both": [ax.xaxis, ax.yaxis]}[which]
    for axis in axes:
        axis.set_major_locator(LogLocator(base=10, subs=subs))
        axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def _legend(ax: Any, **kwargs: Any) -> None:
    """A legend whose markers are opaque even when the points are drawn faint."""
    from matplotlib.collections import PathCollection

    leg = ax.legend(**kwargs)
    for handle in leg.legend_handles:
        if isinstance(handle, PathCollection):
            handle.set_alpha(1.0)


def _group_column(runset: RunSet) -> str | None:
    """The axis that names the model size: `tier` where the run has it, else the first config column."""
    if "tier" in runset.samples.columns:
        return "tier"
    return runset.config_columns[0] if runset.config_columns else None


def _group_labels(samples: pd.DataFrame, group: str | None) -> dict[Any, str]:
    if group is None:
        return {None: "all"}
    labels: dict[Any, str] = {}
    for value, sub in samples.groupby(group, sort=True):
        models = sorted({str(m) for m in sub["model"].unique()}) if "model" in sub.columns else []
        name = f"{group} {_plain(value)}"
        labels[_plain(value)] = f"{name} · {' / '.join(models)}" if models and group != "model" else name
    return labels


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def _config_text(config: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items() if k not in set(skip))


# ---------------------------------------------------------------- manifest


def _duration_s(manifest: Mapping[str, Any]) -> float | None:
    try:
        a = dt.datetime.fromisoformat(str(manifest["started_at"]))
        b = dt.datetime.fromisoformat(str(manifest["ended_at"]))
    except (KeyError, ValueError, TypeError):
        return None
    return (b - a).total_seconds()


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _when(stamp: Any) -> str:
    """ISO-8601 → 'YYYY-mm-dd HH:MM:SS' (UTC); anything else as given."""
    try:
        t = dt.datetime.fromisoformat(str(stamp))
    except (TypeError, ValueError):
        return "?" if stamp is None else str(stamp)
    if t.tzinfo is not None:
        t = t.astimezone(dt.UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S")


def manifest_rows(run: RunInfo) -> list[tuple[str, str]]:
    """(field, value) pairs summarising one run's manifest."""
    m = run.manifest
    env, spec, tel = _dict(m.get("environment")), _dict(m.get("spec")), _dict(m.get("telemetry"))
    rows: list[tuple[str, str]] = []
    counts = f"{m.get('points_done', '?')}/{m.get('points_total', '?')} points done, {m.get('points_failed', 0)} failed"
    rows.append(("status", f"{m.get('status', 'unknown')} ({counts})"))
    dur = _duration_s(m)
    when = f"{_when(m.get('started_at'))} → {_when(m.get('ended_at'))}"
    rows.append(("time (UTC)", when + (f" ({dur / 60:.1f} min)" if dur is not None else "")))
    device = env.get("device")
    if isinstance(device, dict):
        device = device.get("name") or json.dumps(device)
    cores = env.get("cpu_cores")
    rows.append(("device", f"{device}" + (f" ({cores} CPU cores)" if cores else "")))
    rows.append(
        (
            "versions",
            f"vLLM {env.get('vllm', '?')} ({env.get('vllm_build', '?')} build), torch {env.get('torch', '?')}, "
            f"Python {env.get('python', '?')}, tool {m.get('tool_version', '?')}",
        )
    )
    commit = m.get("git_commit")
    if commit:
        rows.append(("git", f"{str(commit)[:10]}{' (dirty)' if m.get('git_dirty') else ''}"))
    mode = m.get("engine_mode") or spec.get("engine_mode")
    rows.append(("engine mode", str(mode)))
    if tel:
        locked = tel.get("clocks_locked_mhz")
        rows.append(
            (
                "telemetry",
                f"{tel.get('source', '?')} every {_f(tel.get('interval_ms'), 0)} ms"
                + (f", clocks locked at {locked} MHz" if locked else "")
                + (f" ({tel.get('reason')})" if tel.get("reason") else ""),
            )
        )
    axes = spec.get("axes")
    mapping = _dict(spec.get("mapping"))
    if isinstance(axes, dict):
        parts = [
            f"{k} = {', '.join(str(v) for v in vals)}" + (f" → {mapping[k]}" if k in mapping else "")
            for k, vals in axes.items()
        ]
        rows.append(("spec axes", "; ".join(parts)))
    rows.append(
        (
            "spec sizes",
            f"reps {spec.get('reps', '?')} distinct prompts + {spec.get('same_prompt_repeats', '?')} repeats of one "
            f"prompt per point, max_new_tokens {spec.get('max_new_tokens', '?')}, "
            f"warm-up {spec.get('warmup_requests', '?')} requests, seed {spec.get('seed', '?')}",
        )
    )
    models = m.get("models")
    if isinstance(models, dict) and models:
        parts = []
        for v in models.values():
            if isinstance(v, dict):
                params = v.get("params")
                size = f" ({params / 1e6:.1f} M params)" if isinstance(params, int | float) else ""
                parts.append(f"tier {v.get('tier', '?')}: {v.get('name', '?')}{size}")
        rows.append(("models", "; ".join(parts)))
    starts = m.get("engine_starts")
    if isinstance(starts, list) and starts:
        secs = [float(s.get("seconds", float("nan"))) for s in starts if isinstance(s, dict)]
        ok = [s for s in secs if math.isfinite(s)]
        count = f"{len(starts)} start{'' if len(starts) == 1 else 's'}"
        if ok and len(ok) > 1:
            count += f", {sum(ok):.0f} s in all ({min(ok):.0f}–{max(ok):.0f} s each)"
        elif ok:
            count += f", {ok[0]:.0f} s"
        rows.append(("engine starts", count))
    summary = _dict(m.get("summary"))
    ratios = [
        f"{p} {summary[f'{p}_harness_over_engine_ratio']:.3f}×"
        for p in PHASES
        if isinstance(summary.get(f"{p}_harness_over_engine_ratio"), int | float)
    ]
    if ratios:
        rows.append(("harness / engine step time", ", ".join(ratios)))
    command = m.get("command")
    if isinstance(command, list):
        rows.append(("command", " ".join(str(c) for c in command)))
    return rows


def manifest_section(runset: RunSet) -> Section:
    sec = Section("manifest", SECTIONS["manifest"])
    per_run = [dict(manifest_rows(r)) for r in runset.runs]
    keys: list[str] = []
    for rows in per_run:
        keys.extend(k for k in rows if k not in keys)
    sec.add(
        Table(
            columns=["", *[r.run_id for r in runset.runs]],
            rows=[[k, *[rows.get(k, "–") for rows in per_run]] for k in keys],
        )
    )
    return sec


# ---------------------------------------------------------------- latency vs length / position


def _fit_by_group(frame: pd.DataFrame, phase: str, group: str | None) -> ClosedForm:
    cols = [group] if group else []
    return ClosedForm(phase, cols).fit(frame)  # type: ignore[arg-type]


def latency_section(runset: RunSet) -> Section:
    """Prefill vs text_tokens and decode vs position, per tier, with the closed-form fit a + b·n + c·n²."""
    sec = Section("latency", SECTIONS["latency"])
    group = _group_column(runset)
    samples = runset.samples
    labels = _group_labels(samples, group)
    pre, dec = runset.phase("prefill"), runset.phase("decode")
    cf_pre = _fit_by_group(pre, "prefill", group)
    cf_dec = _fit_by_group(dec, "decode", group) if len(dec) else None
    fig = _figure(13, 5.0)
    ax_p, ax_d = fig.subplots(1, 2)
    keys = list(labels)
    n_groups = len(keys)
    fit_rows: list[list[str]] = []
    hidden = 0
    dec_cap = float(np.percentile(dec["latency_ms"], 99.5)) * 1.15 if len(dec) else 1.0
    for i, key in enumerate(keys):
        color = _color(i)
        sel_p = pre if group is None else pre[pre[group] == key]
        sel_d = dec if group is None else dec[dec[group] == key]
        cfg = {group: key} if group else {}
        # Prefill: one point per request, tiers nudged apart on the log axis so they do not hide each other.
        if len(sel_p):
            nudge = 1.0 + 0.035 * (i - (n_groups - 1) / 2)
            ax_p.scatter(
                sel_p["text_tokens"] * nudge,
                sel_p["latency_ms"],
                s=14,
                alpha=0.55,
                color=color,
                edgecolors="none",
                label=f"{labels[key]} (measured)",
            )
            coef, _ = cf_pre.coefficients(cfg)
            n = np.geomspace(max(1, sel_p["text_tokens"].min()), sel_p["text_tokens"].max(), 200)
            ax_p.plot(n, coef[0] + coef[1] * n + coef[2] * n**2, color=color, linewidth=1.8)
        if len(sel_d) and cf_dec is not None:
            shown = sel_d[sel_d["latency_ms"] <= dec_cap]
            hidden += len(sel_d) - len(shown)
            ax_d.scatter(
                shown["position"],
                shown["latency_ms"],
                s=4,
                alpha=0.18,
                color=color,
                edgecolors="none",
                rasterized=True,
                label=labels[key],
            )
            dcoef, _ = cf_dec.coefficients(cfg)
            p = np.linspace(sel_d["position"].min(), sel_d["position"].max(), 50)
            ax_d.plot(p, dcoef[0] + dcoef[1] * p, color=color, linewidth=2.2)
        pc, _ = cf_pre.coefficients(cfg)
        dc = cf_dec.coefficients(cfg)[0] if cf_dec is not None else np.full(2, np.nan)
        fit_rows.append(
            [
                labels[key],
                f"{_g(pc[0])} + {_g(pc[1])}·n + {_g(pc[2])}·n²",
                f"{_g(dc[0])} + {_g(dc[1])}·p",
                str(len(sel_p)),
                str(len(sel_d)),
            ]
        )
    ax_p.set_xscale("log", base=2)
    ax_p.set_yscale("log")
    _log_ticks(ax_p, "y")
    ticks = sorted(int(t) for t in pre["text_tokens"].unique())
    if len(ticks) <= 12:
        ax_p.set_xticks(ticks, [str(t) for t in ticks])
        ax_p.xaxis.set_minor_formatter("")
    ax_p.set_xlabel("prompt length text_tokens (tokens, log scale)")
    ax_p.set_ylabel("prefill latency (ms, log scale)")
    ax_p.set_title("Prefill: one point per request; line = fit a + b·n + c·n²", fontsize=11)
    ax_p.legend(fontsize=8, loc="upper left", frameon=False)
    ax_d.set_xlabel("KV position p (tokens in the cache)")
    ax_d.set_ylabel("decode step latency (ms)")
    ax_d.set_title("Decode: one point per step; line = fit a + b·p", fontsize=11)
    ax_d.set_ylim(0, dec_cap)
    _legend(ax_d, fontsize=8, loc="upper left", frameon=False, markerscale=3)
    for ax in (ax_p, ax_d):
        _style(ax)
    note = f" {hidden} decode steps above {dec_cap:.1f} ms (outliers) lie outside the right panel." if hidden else ""
    sec.add(
        Figure(
            f"{FIGURE_PREFIX}latency",
            _png(fig),
            f"Measured step latency per {group or 'config'} with the closed-form least-squares fit "
            f"(relative error, non-negative coefficients; pooled over the other axes).{note}",
        )
    )
    sec.add(
        Table(
            [
                group or "config",
                "prefill fit (ms), n = text_tokens",
                "decode fit (ms), p = position",
                "prefill rows",
                "decode rows",
            ],
            fit_rows,
            "Closed-form coefficients per group (the estimator's reference model, fitted on all rows).",
        )
    )
    return sec


# ---------------------------------------------------------------- Experiment 1: CV per text_tokens bin


def _token_bins(values: pd.Series) -> tuple[pd.Series, dict[str, float]]:
    """Bin label per row and the bin's x position: exact values when there are few, log2 bins otherwise."""
    uniq = np.sort(values.unique())
    if len(uniq) <= MAX_TEXT_TOKEN_BINS:
        return values.astype(int).astype(str), {str(int(v)): float(v) for v in uniq}
    lo, hi = math.floor(math.log2(uniq.min())), math.ceil(math.log2(uniq.max() + 1))
    edges = 2.0 ** np.arange(lo, hi + 1)
    idx = np.clip(np.searchsorted(edges, values.to_numpy(), side="right") - 1, 0, len(edges) - 2)
    labels = [f"{int(edges[i])}–{int(edges[i + 1]) - 1}" for i in idx]
    centers = {f"{int(edges[i])}–{int(edges[i + 1]) - 1}": float(np.sqrt(edges[i] * edges[i + 1])) for i in set(idx)}
    return pd.Series(labels, index=values.index), centers


def spread_section(runset: RunSet) -> tuple[Section, dict[str, Any]]:
    """CV across different prompts per text_tokens bin, against the 10% / 15% bars and the noise floor."""
    sec = Section("spread", SECTIONS["spread"])
    try:
        analysis = analyze_runs(runset)
    except EstimatorError as exc:
        sec.add(Note(f"Experiment 1 could not run on these runs: {exc}"))
        return sec, {}
    table = analysis.table.copy()
    group = _group_column(runset)
    table["bin"], centers = _token_bins(table["text_tokens"])
    fig = _figure(13, 5.2)
    axes = fig.subplots(1, 2, sharey=False)
    labels = _group_labels(runset.samples, group)
    order = sorted(centers, key=lambda b: centers[b])
    rows_out: dict[str, list[str]] = {b: [b] for b in order}
    for ax, phase in zip(axes, PHASES, strict=True):
        d_col, s_col = f"{phase}_cv_distinct_pct", f"{phase}_cv_same_pct"
        for i, key in enumerate(labels):
            sub = table if group is None else table[table[group] == key]
            x = sub["bin"].map(centers) * (1.0 + 0.03 * (i - (len(labels) - 1) / 2))
            ax.scatter(
                x, sub[d_col], s=18, alpha=0.6, color=_color(i), edgecolors="none", label=f"{labels[key]}: one config"
            )
        med_d = table.groupby("bin")[d_col].median().reindex(order)
        med_s = table.groupby("bin")[s_col].median().reindex(order)
        xs = [centers[b] for b in order]
        ax.plot(xs, med_d.to_numpy(), color="black", linewidth=2, marker="o", label="median CV, distinct prompts")
        ax.plot(
            xs,
            med_s.to_numpy(),
            color="#555555",
            linewidth=1.6,
            linestyle="--",
            marker="s",
            markersize=4,
            label="noise floor: median CV, same prompt repeated",
        )
        ax.axhline(
            CV_SUFFICIENT_PCT,
            color="#2ca02c",
            linestyle=":",
            linewidth=1.6,
            label=f"{CV_SUFFICIENT_PCT:.0f}%: token count suffices below",
        )
        ax.axhline(
            CV_INSUFFICIENT_PCT,
            color="#d62728",
            linestyle=":",
            linewidth=1.6,
            label=f"{CV_INSUFFICIENT_PCT:.0f}%: more information needed above",
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, order)
        ax.xaxis.set_minor_formatter("")
        ax.set_xlabel("prompt length text_tokens (tokens)")
        ax.set_ylabel("coefficient of variation (%)")
        what = "prefill latency" if phase == "prefill" else "decode step latency (per position, median over steps)"
        ax.set_title(f"{phase.capitalize()}: CV of {what}", fontsize=11)
        top = np.nanmax([table[d_col].max(), table[s_col].max(), CV_INSUFFICIENT_PCT])
        ax.set_ylim(0, float(top) * 1.12 if math.isfinite(top) else 20)
        _style(ax)
        for b in order:
            rows_out[b] += [_f(med_d[b], 1), _f(med_s[b], 1)]
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    sec.add(
        Figure(
            f"{FIGURE_PREFIX}spread",
            _png(fig),
            "Coefficient of variation of latency at equal text_tokens and config: across different prompts "
            "(points, one per config; black line = median) vs across repeats of one prompt (dashed: the "
            "measurement noise floor). Below 10% the token count suffices; above 15% more information is needed.",
        )
    )
    counts = table.groupby("bin")["prefill_n_distinct"].size().reindex(order)
    sec.add(
        Table(
            [
                "text_tokens",
                "prefill CV distinct %",
                "prefill CV same %",
                "decode CV distinct %",
                "decode CV same %",
                "configs",
            ],
            [rows_out[b] + [str(int(counts[b]))] for b in order],
            "Median over configs per text_tokens bin.",
        )
    )
    sec.add(Bullets([f"{p}: {analysis.summary[p]['reading']}" for p in PHASES]))
    return sec, analysis.summary


# ---------------------------------------------------------------- predicted vs measured


@dataclass
class _Evaluated:
    label: str
    frames: dict[str, pd.DataFrame]  # phase → latency_ms, predicted_ms, group column


def _scatter_pred(ev: _Evaluated, group: str | None, labels: Mapping[Any, str]) -> Any:
    fig = _figure(13, 5.3)
    fig.suptitle(ev.label, fontsize=12, fontweight="bold")
    axes = fig.subplots(1, 2)
    for ax, phase in zip(axes, PHASES, strict=True):
        f = ev.frames.get(phase)
        if f is None or f.empty:
            ax.text(0.5, 0.5, f"no {phase} rows", ha="center", transform=ax.transAxes)
            continue
        for i, key in enumerate(labels):
            sub = f if group is None or group not in f.columns else f[f[group] == key]
            ax.scatter(
                sub["latency_ms"],
                sub["predicted_ms"],
                s=6 if phase == "decode" else 14,
                alpha=0.25 if phase == "decode" else 0.6,
                color=_color(i),
                edgecolors="none",
                rasterized=True,
                label=labels[key],
            )
        # Limits from the 0.2-99.8 percentiles: a few stray steps (e.g. 0.05 ms) would squash the cloud.
        both = np.concatenate([f["latency_ms"].to_numpy(), f["predicted_ms"].to_numpy()])
        lo, hi = float(np.percentile(both, 0.2)) * 0.85, float(np.percentile(both, 99.8)) * 1.15
        outside = int(
            (
                (f["latency_ms"] < lo) | (f["latency_ms"] > hi) | (f["predicted_ms"] < lo) | (f["predicted_ms"] > hi)
            ).sum()
        )
        line = np.geomspace(lo, hi, 50)
        ax.plot(line, line, color="black", linewidth=1, label="predicted = measured")
        ax.fill_between(line, line * 0.9, line * 1.1, color="gray", alpha=0.15, label="±10%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_ticks(ax)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        m = error_metrics(f["latency_ms"].to_numpy(), f["predicted_ms"].to_numpy())
        off = f", {outside} off the axes" if outside else ""
        ax.set_title(
            f"{phase.capitalize()}: MAPE {m['mape_pct']:.1f}%, R² {m['r2']:.3f} ({len(f)} rows{off})", fontsize=11
        )
        ax.set_xlabel(f"measured {phase} latency (ms, log scale)")
        ax.set_ylabel(f"predicted {phase} latency (ms, log scale)")
        _legend(ax, fontsize=8, loc="upper left", frameon=False, markerscale=2)
        _style(ax)
    return fig


def _metric_row(source: str, phase: str, f: pd.DataFrame, floor: float) -> list[str]:
    m = error_metrics(f["latency_ms"].to_numpy(), f["predicted_ms"].to_numpy())
    ratio = m["mape_pct"] / floor if math.isfinite(floor) and floor > 0 else float("nan")
    return [
        source,
        phase,
        str(len(f)),
        _f(m["r2"], 3),
        _f(m["mae_ms"], 3),
        _f(m["mape_pct"]),
        _f(ratio),
        _f(m["p90_ape_pct"]),
    ]


def _held_out_predictions(compare_dir: Path | None, variant: str) -> pd.DataFrame | None:
    if compare_dir is None or not (compare_dir / "predictions.parquet").is_file():
        return None
    preds = pd.read_parquet(compare_dir / "predictions.parquet")
    sel = preds[(preds["split"] == "by_prompt") & (preds["predictor"] == variant)]
    return sel if len(sel) else None


def _model_provenance(est: Any, runset: RunSet) -> tuple[str, str]:
    """('in-sample' | 'partly in-sample' | 'out-of-sample', a sentence saying why)."""
    trained_on = {r.run_id for r in est.meta.training.runs}
    here = {r.run_id for r in runset.runs}
    overlap = trained_on & here
    if overlap == here:
        return "in-sample", (
            "IN-SAMPLE: the model was trained on these very rows, so its errors on them are optimistic; the "
            "held-out figures are the honest ones."
        )
    if overlap:
        return "partly in-sample", f"PARTLY IN-SAMPLE: the model was trained on {', '.join(sorted(overlap))}."
    return "out-of-sample", f"OUT-OF-SAMPLE: the model was trained on other runs ({', '.join(sorted(trained_on))})."


def _predict_rows(est: Any, runset: RunSet, group: str | None) -> dict[str, pd.DataFrame]:
    frames: dict[str, pd.DataFrame] = {}
    for phase in PHASES:
        f = runset.phase(phase)
        if est.meta.variant == "embedding":
            f = runset.with_text(f)
        pred = est.predict_prefill(f) if phase == "prefill" else est.predict_decode(f)
        keep = [c for c in (group, "latency_ms") if c and c in f.columns]
        frames[phase] = f[keep].assign(predicted_ms=pred)
    return frames


def accuracy_section(
    runset: RunSet, model_dir: Path | None, compare_dir: Path | None, floors: Mapping[str, float]
) -> tuple[Section, dict[str, Any]]:
    """Compare's held-out predictions (when present) and the chosen model on the run's rows (in-sample when it was
    trained on them), with error figures against the noise floor."""
    from estimator.model import LatencyEstimator

    sec = Section("accuracy", SECTIONS["accuracy"])
    facts: dict[str, Any] = {}
    group = _group_column(runset)
    labels = _group_labels(runset.samples, group)
    rows: list[list[str]] = []
    est = LatencyEstimator.load(model_dir) if model_dir is not None else None
    variant = est.meta.variant if est is not None else "tokens"
    if est is None or model_dir is None:
        sec.add(
            Note(
                "No model given: pass `--model models/NAME` (written by `estimate train`) to see how a "
                "trained estimator scores on this run."
            )
        )
    else:
        kind, why = _model_provenance(est, runset)
        facts.update(model_kind=kind, variant=variant)
        t = est.meta.training
        sec.add(
            Paragraph(
                f"Model `{model_dir}`: variant `{variant}`, trained {est.meta.created_at} on "
                f"{t.rows.get('prefill', 0)} prefill + {t.rows.get('decode', 0)} decode rows of "
                f"{', '.join(r.run_id for r in t.runs)}. {why}"
            )
        )
    held = _held_out_predictions(compare_dir, variant)
    if held is not None:
        frames: dict[str, pd.DataFrame] = {p: held[held["phase"] == p].reset_index(drop=True) for p in PHASES}
        ev = _Evaluated(f"Held out by prompt: {variant} refitted by estimate compare without the test prompts", frames)
        sec.add(
            Figure(
                f"{FIGURE_PREFIX}accuracy-held-out",
                _png(_scatter_pred(ev, group, labels)),
                f"HELD OUT BY PROMPT (from `{compare_dir}/predictions.parquet`): the `{variant}` variant "
                "refitted by `estimate compare` without the test prompts, scored on them.",
            )
        )
        for phase in PHASES:
            if len(frames[phase]):
                rows.append(
                    _metric_row("compare, held out by prompt", phase, frames[phase], floors.get(phase, math.nan))
                )
    else:
        sec.add(
            Note(
                "No held-out predictions (`compare/predictions.parquet`) for this run: run "
                "`estimate compare RUN` to score the variants on prompts they never saw."
            )
        )
    if est is not None and model_dir is not None:
        if est.meta.held_out:
            ho = est.meta.held_out
            for ho_phase, m in ho.metrics.items():
                floor = floors.get(ho_phase, math.nan)
                mape = m.get("mape_pct")
                ratio = mape / floor if mape is not None and math.isfinite(floor) and floor > 0 else None
                rows.append(
                    [
                        f"model's meta.json: {ho.description}",
                        ho_phase,
                        "–",
                        _f(m.get("r2"), 3),
                        _f(m.get("mae_ms"), 3),
                        _f(mape),
                        _f(ratio),
                        _f(m.get("p90_ape_pct")),
                    ]
                )
            facts["held_out_mape_pct"] = {p: m.get("mape_pct") for p, m in ho.metrics.items()}
        try:
            frames = _predict_rows(est, runset, group)
        except EstimatorError as exc:
            sec.add(Note(f"The model could not predict these rows: {exc}"))
        else:
            kind = facts["model_kind"]
            ev = _Evaluated(f"{kind.upper()}: model {model_dir.name} on every row of the run(s)", frames)
            sec.add(
                Figure(
                    f"{FIGURE_PREFIX}accuracy-model",
                    _png(_scatter_pred(ev, group, labels)),
                    f"{kind.upper()}: model `{model_dir.name}` ({variant}) on every row of the run(s).",
                )
            )
            for phase in PHASES:
                rows.append(
                    _metric_row(f"model on these rows, {kind}", phase, frames[phase], floors.get(phase, math.nan))
                )
            facts["model_mape_pct"] = {
                p: error_metrics(frames[p]["latency_ms"].to_numpy(), frames[p]["predicted_ms"].to_numpy())["mape_pct"]
                for p in PHASES
            }
    if rows:
        sec.add(
            Table(
                ["source", "phase", "rows", "R²", "MAE ms", "MAPE %", "× noise floor", "p90 APE %"],
                rows,
                "× noise floor: MAPE divided by the same-prompt leave-one-out MAPE (no estimator can "
                "reliably beat 1.0).",
            )
        )
    return sec, facts


# ---------------------------------------------------------------- Experiment 2: variants


def _variants_table(scores: pd.DataFrame, models: Sequence[str], splits: Sequence[str], path: Path) -> Table:
    """One row per model: MAPE per split and phase, × noise floor and R² (by prompt), cost per prediction."""
    idx = scores.set_index(["split", "phase", "model"])

    def cell(split: str, phase: str, model: str, col: str, digits: int = 2) -> str:
        key = (split, phase, model)
        return _f(idx.loc[key, col], digits) if key in idx.index and col in idx.columns else "–"

    columns = ["model"]
    for split in splits:
        columns += [f"{split.replace('_', ' ')}: {p} MAPE %" for p in PHASES]
    columns += [f"{p} × noise floor" for p in PHASES] + [f"{p} R²" for p in PHASES]
    columns += [f"{p} cost µs" for p in PHASES]
    rows = []
    for m in models:
        row = [m]
        for split in splits:
            row += [cell(split, p, m, "mape_pct") for p in PHASES]
        row += [cell("by_prompt", p, m, "mape_vs_noise_floor") for p in PHASES]
        row += [cell("by_prompt", p, m, "r2", 3) for p in PHASES]
        row += [cell("by_prompt", p, m, "cost_us", 0) for p in PHASES]
        rows.append(row)
    return Table(
        columns,
        rows,
        f"× noise floor, R² and cost (one prediction, feature computation included) on the "
        f"by-prompt split. Every figure per split and phase (MAE ms, p90 APE %, train s) is in "
        f"{path.with_suffix('.csv')}.",
    )


def variants_section(compare_dir: Path | None, run_ids: Sequence[str]) -> tuple[Section, dict[str, Any]]:
    sec = Section("variants", SECTIONS["variants"])
    path = compare_dir / "compare.json" if compare_dir else None
    if path is None or not path.is_file():
        sec.add(
            Note(
                "No compare/compare.json for this run: run `estimate compare RUN` to compare the feature "
                "variants (tokens, buckets, poly, embedding, residual) and the reference models on "
                "held-out prompts and held-out lengths."
            )
        )
        return sec, {}
    payload = json.loads(path.read_text())
    scores = pd.DataFrame(payload.get("scores") or [])
    if scores.empty:
        sec.add(Note(f"{path} holds no scores."))
        return sec, {}
    if sorted(payload.get("runs") or []) != sorted(run_ids):
        sec.add(Note(f"{path} was computed on runs {payload.get('runs')}, not exactly on the runs of this report."))
    splits = payload.get("splits") or {}
    floors = {p: (payload.get("noise_floor") or {}).get(p, {}).get("mape_pct") for p in PHASES}
    models = list(dict.fromkeys(scores["model"]))
    fig = _figure(13, 5.0)
    axes = fig.subplots(1, 2)
    width = 0.38
    split_names = [s for s in ("by_prompt", "by_length") if s in set(scores["split"])]
    split_colors = {"by_prompt": "#1f77b4", "by_length": "#ff7f0e"}
    floor_label = "noise floor (same prompt repeated, leave-one-out MAPE): " + ", ".join(
        f"{p} {v:.1f}%" for p, v in floors.items() if isinstance(v, int | float)
    )
    for ax, phase in zip(axes, PHASES, strict=True):
        x = np.arange(len(models))
        for j, split in enumerate(split_names):
            sub = scores[(scores["phase"] == phase) & (scores["split"] == split)].set_index("model")
            vals = [float(sub.loc[m, "mape_pct"]) if m in sub.index else np.nan for m in models]
            bars = ax.bar(
                x + (j - (len(split_names) - 1) / 2) * width,
                vals,
                width,
                color=split_colors.get(split, _color(j)),
                label=f"held out {split.replace('_', ' ')}",
            )
            ax.bar_label(bars, labels=[_f(v, 1) for v in vals], fontsize=7, padding=1)
        floor = floors.get(phase)
        if isinstance(floor, int | float):
            ax.axhline(floor, color="black", linestyle="--", linewidth=1.2, label=floor_label)
        ax.set_xticks(
            np.arange(len(models)),
            [m.replace("_", " ") for m in models],
            fontsize=9,
            rotation=20,
            ha="right",
            rotation_mode="anchor",
        )
        ax.set_ylabel("MAPE (%)")
        ax.set_title(f"{phase.capitalize()}: held-out MAPE per model", fontsize=11)
        ax.margins(y=0.12)
        _style(ax)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=3, fontsize=9, frameon=False)
    desc = "; ".join(f"{k}: {v}" for k, v in splits.items())
    sec.add(
        Figure(
            f"{FIGURE_PREFIX}variants",
            _png(fig),
            f"Mean absolute percentage error per variant and reference model, on two held-out splits ({desc}).",
        )
    )
    sec.add(_variants_table(scores, models, split_names, path))
    verdict = payload.get("verdict") or {}
    lines = [str(line) for line in verdict.get("lines") or []]
    if lines:
        sec.add(Paragraph("Verdict (from `estimate compare`):"))
        sec.add(Bullets(lines))
    return sec, {"embedding_answer": verdict.get("embedding_answer") or []}


# ---------------------------------------------------------------- telemetry


def read_telemetry(run_dir: Path) -> pd.DataFrame:
    """All finished telemetry files of a run (t_s on the perf_counter clock), sorted by time."""
    folder = run_dir / "telemetry"
    out = read_parquet_folder(folder)
    if out.empty:
        return out
    if "t_s" not in out.columns:
        raise EstimatorError(f"{folder}: telemetry lacks the t_s column")
    return out.sort_values("t_s").reset_index(drop=True)


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
    fig = _figure(13, 1.3 + 1.55 * n_panels)
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
        _log_ticks(ax0, "y", subs=(1.0,))
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
        stats.append([label, _f(np.min(ok), 1), _f(np.median(ok), 1), _f(np.max(ok), 1)])
    for ax in axes:
        for i, (a, b) in enumerate(spans):
            span_label = "throttled (clock-event reason other than idle)" if ax is ax0 and i == 0 else None
            ax.axvspan(float(axis(a)), float(axis(b)), color="#d62728", alpha=0.18, linewidth=0, label=span_label)
        for x, _real in axis.gaps:
            ax.axvspan(x, x + axis.shown_gap_s, color="#bbbbbb", alpha=0.35, linewidth=0)
        _style(ax)
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
        _legend(ax0, fontsize=8, loc="upper left", frameon=False, markerscale=2, ncol=3)
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


def telemetry_section(runset: RunSet) -> Section:
    sec = Section("telemetry", SECTIONS["telemetry"])
    for run in runset.runs[:MAX_TELEMETRY_RUNS]:
        tel = read_telemetry(run.path)
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
                _png(fig),
                f"Run {run.run_id}, telemetry source `{source}` ({len(tel)} samples): engine step latency "
                "and counters over the run. Purple dotted lines: the first timed step after each engine start "
                f"(labelled model and block size); nothing is sampled between points. {note}",
            )
        )
        sec.add(Table(["counter", "min", "median", "max"], stats, f"Run {run.run_id}: telemetry ranges."))
    if len(runset.runs) > MAX_TELEMETRY_RUNS:
        sec.add(Note(f"Telemetry shown for the first {MAX_TELEMETRY_RUNS} of {len(runset.runs)} runs."))
    return sec


# ---------------------------------------------------------------- feature importance


def feature_importance(model_dir: Path) -> dict[str, pd.Series]:
    """Gain importance per phase (share of the total, %) from the LightGBM text models in a model folder."""
    import lightgbm as lgb

    meta_path = model_dir / "meta.json"
    files: dict[str, Path] = {}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        for phase, pm in (meta.get("phases") or {}).items():
            files[str(phase)] = model_dir / str(pm.get("model_file", f"{phase}.txt"))
    else:
        files = {p.stem: p for p in sorted(model_dir.glob("*.txt"))}
    out: dict[str, pd.Series] = {}
    for phase, path in files.items():
        if not path.is_file():
            raise EstimatorError(f"{model_dir}: missing LightGBM model file {path.name}")
        booster = lgb.Booster(model_file=str(path))
        gain = pd.Series(booster.feature_importance("gain"), index=booster.feature_name(), dtype="float64")
        emb = gain[gain.index.str.startswith("emb_")]
        if len(emb):
            gain = gain.drop(emb.index)
            gain[f"embedding ({len(emb)} dims, summed)"] = emb.sum()
        total = gain.sum()
        out[phase] = (gain / total * 100.0 if total > 0 else gain).sort_values(ascending=True)
    return out


def importance_section(model_dir: Path | None) -> Section:
    sec = Section("importance", SECTIONS["importance"])
    if model_dir is None:
        sec.add(
            Note(
                "No model given: pass `--model models/NAME` to see which features the LightGBM trees split "
                "on (gain importance)."
            )
        )
        return sec
    imp = feature_importance(model_dir)
    phases = [p for p in PHASES if p in imp] + [p for p in imp if p not in PHASES]
    fig = _figure(13, 1.6 + 0.32 * max(len(s) for s in imp.values()))
    axes = np.atleast_1d(fig.subplots(1, len(phases)))
    for ax, phase in zip(axes, phases, strict=True):
        s = imp[phase]
        bars = ax.barh(list(s.index), s.to_numpy(), color="#1f77b4")
        ax.bar_label(bars, labels=[f"{v:.1f}%" for v in s.to_numpy()], fontsize=8, padding=2)
        ax.set_xlabel("share of total split gain (%)")
        ax.set_title(f"{phase.capitalize()} model", fontsize=11)
        ax.set_xlim(0, max(100.0, float(s.max()) * 1.15))
        _style(ax)
    sec.add(
        Figure(
            f"{FIGURE_PREFIX}importance",
            _png(fig),
            f"LightGBM gain importance of `{model_dir}` (how much each feature reduced the training loss, "
            "summed over all splits). Gain on log latency; shares, not effect sizes.",
        )
    )
    names = sorted({n for s in imp.values() for n in s.index})
    rows = [[n, *[_f(imp[p].get(n), 1) for p in phases]] for n in names]
    rows.sort(key=lambda r: -max(float(v) if v != "–" else 0.0 for v in r[1:]))
    sec.add(Table(["feature", *[f"{p} gain %" for p in phases]], rows))
    return sec


# ---------------------------------------------------------------- nightly trend


def read_history(path: Path) -> list[dict[str, Any]]:
    """Nightly history lines (JSONL); damaged lines are skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def nightly_section(history: list[dict[str, Any]], summary: Mapping[str, Any] | None) -> Section:
    """Median latency per config and phase over nights, and tonight's comparison against the baseline."""
    sec = Section("nightly", SECTIONS["nightly"])
    if summary:
        flagged = bool(summary.get("regression"))
        status = "REGRESSION FLAGGED" if flagged else "no regression"
        base = summary.get("baseline_run_id") or "none (tonight accepted as the first baseline)"
        sec.add(
            Paragraph(
                f"Tonight `{summary.get('run_id')}` vs baseline `{base}`: **{status}**. {summary.get('rule', '')}"
            )
        )
        rows = []
        for c in summary.get("comparisons") or []:
            ci = c.get("ci") or [None, None]
            again = c.get("confirm") or {}
            rerun = (
                f"{_f(again.get('ratio'), 3)} ({_f((again.get('ci') or [None])[0], 3)} – "
                f"{_f((again.get('ci') or [None, None])[1], 3)})"
                if again
                else "–"
            )
            rows.append(
                [
                    c.get("label", ""),
                    c.get("phase", ""),
                    _f(c.get("baseline_median_ms"), 2),
                    _f(c.get("tonight_median_ms"), 2),
                    _f(c.get("ratio"), 3),
                    f"{_f(ci[0], 3)} – {_f(ci[1], 3)}",
                    str(c.get("requests", "–")),
                    rerun,
                    "FLAGGED" if c.get("flagged") else "improved" if c.get("improved") else "ok",
                ]
            )
        if rows:
            sec.add(
                Table(
                    [
                        "config",
                        "phase",
                        "baseline median ms",
                        "tonight median ms",
                        "ratio",
                        "95% CI of ratio",
                        "requests (base/tonight)",
                        "re-run ratio (95% CI)",
                        "status",
                    ],
                    rows,
                    "Ratio: geometric mean over text_tokens of median(tonight) / median(baseline) per request; "
                    "CI by bootstrap over requests. Re-run: a second sweep made when a config was flagged; the "
                    "flag stands only if the re-run repeats it.",
                )
            )
        mape_rows = []
        for c in summary.get("estimator_checks") or []:
            mape_rows.append(
                [
                    c.get("phase", ""),
                    _f(c.get("baseline_mape_pct")),
                    _f(c.get("tonight_mape_pct")),
                    _f(c.get("growth_pct"), 1),
                    "FLAGGED" if c.get("flagged") else "ok",
                ]
            )
        if mape_rows:
            sec.add(
                Table(
                    ["phase", "baseline held-out MAPE %", "tonight held-out MAPE %", "growth %", "status"],
                    mape_rows,
                    "Estimator's held-out (by prompt) error, from each night's model meta.json.",
                )
            )
        cond = summary.get("conditions") or {}
        keys = sorted({k for side in cond.values() if isinstance(side, dict) for k in side})
        if keys:
            sides = [s for s in ("baseline", "tonight") if isinstance(cond.get(s), dict)]
            sec.add(
                Table(
                    ["measuring conditions (median over steps)", *sides],
                    [[k, *[_f(cond[s].get(k), 2) for s in sides]] for k in keys],
                    "From each step's telemetry snapshot: what the machine was doing while the run measured.",
                )
            )
        for w in summary.get("warnings") or []:
            sec.add(Note(str(w)))
    if not history:
        sec.add(Note("No nightly history yet."))
        return sec
    fig = _figure(13, 4.6)
    axes = fig.subplots(1, 2)
    nights = [str(h.get("run_id", i)) for i, h in enumerate(history)]
    for ax, phase in zip(axes, PHASES, strict=True):
        series: dict[str, list[tuple[int, float, bool]]] = {}
        for i, h in enumerate(history):
            for m in h.get("medians") or []:
                if m.get("phase") != phase or not isinstance(m.get("median_ms"), int | float):
                    continue
                series.setdefault(str(m.get("label")), []).append((i, float(m["median_ms"]), bool(m.get("flagged"))))
        for j, (label, pts) in enumerate(sorted(series.items())):
            xs, ys, fl = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", markersize=4, color=_color(j), label=label)
            bad = [(x, y) for x, y, f in pts if f]
            if bad:
                bx, by = zip(*bad, strict=True)
                ax.scatter(bx, by, s=120, facecolors="none", edgecolors="#d62728", linewidths=2, zorder=5)
        for i, h in enumerate(history):
            if h.get("accepted"):
                ax.axvline(i, color="#2ca02c", linestyle=":", linewidth=1.2)
        ax.set_xticks(range(len(nights)), [n[-15:] for n in nights], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"median {phase} latency (ms)")
        ax.set_title(f"{phase.capitalize()}: median per config over nights", fontsize=11)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8, loc="upper left", frameon=False)
        _style(ax)
    sec.add(
        Figure(
            f"{FIGURE_PREFIX}nightly-trend",
            _png(fig),
            "Median latency per config over nights (one point per nightly run; red rings: flagged as a "
            "regression that night; green dotted lines: nights accepted as the baseline).",
        )
    )
    return sec


# ---------------------------------------------------------------- the whole report


def _compare_dir(runset: RunSet) -> Path | None:
    path = runset.runs[0].path / "compare"
    return path if (path / "compare.json").is_file() or (path / "predictions.parquet").is_file() else None


def glance_section(
    runset: RunSet,
    exp1: Mapping[str, Any],
    acc: Mapping[str, Any],
    variants: Mapping[str, Any],
    nightly: Mapping[str, Any] | None,
    missing: Sequence[str],
) -> Section:
    sec = Section("glance", SECTIONS["glance"])
    items = []
    for r in runset.runs:
        rows = dict(manifest_rows(r))
        items.append(f"Run `{r.run_id}`: {rows.get('status', '?')} on {rows.get('device', '?')}.")
    samples = runset.samples
    items.append(
        f"{len(samples)} timed steps ({int((samples['phase'] == 'prefill').sum())} prefill, "
        f"{int((samples['phase'] == 'decode').sum())} decode), {samples['prompt_id'].nunique()} prompts, "
        f"text_tokens {int(samples['text_tokens'].min())}–{int(samples['text_tokens'].max())}, "
        f"configs over {', '.join(runset.config_columns)}."
    )
    for p in PHASES:
        if p in exp1:
            e = exp1[p]
            items.append(
                f"Experiment 1, {p}: median CV across different prompts {_f(e.get('median_cv_distinct_pct'), 1)}% "
                f"vs {_f(e.get('median_cv_same_pct'), 1)}% for repeats of one prompt (noise floor) → "
                f"**{e.get('verdict')}** (bars: {CV_SUFFICIENT_PCT:.0f}% / {CV_INSUFFICIENT_PCT:.0f}%)."
            )
    if "held_out_mape_pct" in acc:
        figs = ", ".join(f"{p} {_f(v)}%" for p, v in acc["held_out_mape_pct"].items())
        items.append(f"Model ({acc.get('variant')}): held-out MAPE by prompt {figs} (from its meta.json).")
    items.extend(str(line) for line in variants.get("embedding_answer") or [])
    if nightly:
        items.append(
            f"Nightly: {'REGRESSION FLAGGED' if nightly.get('regression') else 'no regression'} against baseline "
            f"`{nightly.get('baseline_run_id')}`."
        )
    sec.add(Bullets(items))
    if missing:
        sec.add(Note("Missing from this report: " + "; ".join(missing)))
    return sec


def build_report(spec: ReportSpec, progress: Callable[[str], None] | None = None) -> Report:
    """Load the runs (and the model, compare/ outputs, nightly history) and build every section."""
    say = progress or (lambda _msg: None)
    runset = load_runs(spec.runs)
    run_ids = [r.run_id for r in runset.runs]
    compare_dir = _compare_dir(runset)
    missing: list[str] = []
    if spec.model is None:
        missing.append("a model (`--model models/NAME`): no predicted-vs-measured plot, no feature importance")
    if compare_dir is None:
        missing.append(
            f"`estimate compare {runset.runs[0].path}` outputs: no variant comparison, no held-out predictions"
        )
    say("manifest")
    manifest = manifest_section(runset)
    say("latency vs length")
    latency = latency_section(runset)
    say("Experiment 1")
    spread, exp1 = spread_section(runset)
    floors = {p: f.mape_pct for p, f in noise_floor(runset.samples, runset.config_columns).items()}
    say("predicted vs measured")
    accuracy, acc = accuracy_section(runset, spec.model, compare_dir, floors)
    say("variants")
    variants, var = variants_section(compare_dir, run_ids)
    say("telemetry")
    telemetry = telemetry_section(runset)
    say("feature importance")
    importance = importance_section(spec.model)
    sections = [manifest, latency, spread, accuracy, variants, telemetry, importance]
    summary: dict[str, Any] | None = None
    if spec.nightly_summary is not None and spec.nightly_summary.is_file():
        summary = json.loads(spec.nightly_summary.read_text())
    if spec.history is not None or summary is not None:
        say("nightly trend")
        history = read_history(spec.history) if spec.history is not None else []
        sections.insert(0, nightly_section(history, summary))  # the reason a nightly page exists: first
    glance = glance_section(runset, exp1, acc, var, summary, missing)
    title = spec.title or f"Latency report: {', '.join(run_ids)}"
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"Generated {generated} by `estimate report` from {', '.join(str(r.path) for r in runset.runs)}"
    if spec.model is not None:
        subtitle += f" with model {spec.model}"
    return Report(title=title, subtitle=subtitle, sections=[glance, *sections], missing=missing)


def write_report(spec: ReportSpec, progress: Callable[[str], None] | None = None) -> ReportFiles:
    """Build the report of `spec` and write it into `spec.out`."""
    return build_report(spec, progress).write(spec.out)


# ---------------------------------------------------------------- rendering


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;background:#f6f7f9;
color:#1d2430;line-height:1.45;font-size:15px}
main{max-width:1340px;margin:0 auto;padding:24px 32px 64px;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 10px;padding-top:10px;border-top:2px solid #e3e6ea}
.subtitle{color:#5b6675;font-size:13px;margin-bottom:12px}
nav{font-size:14px;margin:10px 0 6px}nav a{margin-right:14px;color:#1f5fa8;text-decoration:none}
nav a:hover{text-decoration:underline}
figure{margin:14px 0 18px}figure img{width:100%;height:auto;border:1px solid #e3e6ea}
figcaption{font-size:13px;color:#4a5563;margin-top:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0 16px;width:auto;max-width:100%}
th,td{border:1px solid #dde1e6;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}tr:nth-child(even) td{background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
caption{caption-side:bottom;text-align:left;font-size:12px;color:#5b6675;padding-top:3px}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:8px 12px;margin:10px 0;font-size:14px}
code{background:#eef1f5;padding:0 3px;border-radius:3px;font-size:90%}
ul{margin:6px 0 12px}li{margin:2px 0}
"""

_NUMERIC = re.compile(r"^[-+]?[\d.,]+\s*(%|×|ms|s)?$|^–$")


def _inline_html(text: str) -> str:
    """Escape, then `code` and **bold**."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{_inline_html(c)}</th>" for c in t.columns)
    body = []
    for row in t.rows:
        cells = "".join(
            f'<td class="num">{_inline_html(v)}</td>' if _NUMERIC.match(v.strip()) else f"<td>{_inline_html(v)}</td>"
            for v in row
        )
        body.append(f"<tr>{cells}</tr>")
    caption = f"<caption>{_inline_html(t.caption)}</caption>" if t.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(report: Report) -> str:
    """One self-contained page: inline CSS, PNGs as data URIs, no scripts, no external links needed."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(report.title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{html.escape(report.title)}</h1>",
        f'<div class="subtitle">{_inline_html(report.subtitle)}</div>',
        "<nav>" + "".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in report.sections) + "</nav>",
    ]
    for s in report.sections:
        parts.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Paragraph):
                parts.append(f"<p>{_inline_html(b.text)}</p>")
            elif isinstance(b, Bullets):
                parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>")
            elif isinstance(b, Note):
                parts.append(f'<div class="note">{_inline_html(b.text)}</div>')
            elif isinstance(b, Table):
                parts.append(_html_table(b))
            else:
                data = base64.b64encode(b.png).decode("ascii")
                parts.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.caption, quote=True)}">'
                    f"<figcaption>{_inline_html(b.caption)}</figcaption></figure>"
                )
        parts.append("</section>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _md_cell(v: str) -> str:
    return v.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report) -> str:
    """The same document as Markdown; figures are referenced as PNG files in the same folder."""
    lines = [f"# {report.title}", "", f"_{report.subtitle}_", ""]
    for s in report.sections:
        lines += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Paragraph):
                lines += [b.text, ""]
            elif isinstance(b, Bullets):
                lines += [f"- {i}" for i in b.items] + [""]
            elif isinstance(b, Note):
                lines += [f"> **Note:** {b.text}", ""]
            elif isinstance(b, Table):
                lines.append("| " + " | ".join(_md_cell(c) or " " for c in b.columns) + " |")
                lines.append("|" + "|".join("---" for _ in b.columns) + "|")
                lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in b.rows]
                lines += ["", f"_{b.caption}_", ""] if b.caption else [""]
            else:
                lines += [f"![{s.title}]({b.name}.png)", "", f"_{b.caption}_", ""]
    return "\n".join(lines)


__all__ = [
    "SECTIONS",
    "Report",
    "ReportFiles",
    "ReportSpec",
    "build_report",
    "feature_importance",
    "read_history",
    "read_telemetry",
    "throttled_spans",
    "write_report",
]
