"""The nightly trend: median latency per config over nights, and tonight against the baseline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from estimator.data.runs import PHASES
from estimator.report.document import (
    FIGURE_PREFIX,
    SECTIONS,
    Figure,
    Note,
    Paragraph,
    Section,
    Table,
)
from estimator.report.plots import (
    fmt,
    new_figure,
    palette,
    png_bytes,
    style_axes,
)

# ---------------------------------------------------------------- nightly trend


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
                f"{fmt(again.get('ratio'), 3)} ({fmt((again.get('ci') or [None])[0], 3)} – "
                f"{fmt((again.get('ci') or [None, None])[1], 3)})"
                if again
                else "–"
            )
            rows.append(
                [
                    c.get("label", ""),
                    c.get("phase", ""),
                    fmt(c.get("baseline_median_ms"), 2),
                    fmt(c.get("tonight_median_ms"), 2),
                    fmt(c.get("ratio"), 3),
                    f"{fmt(ci[0], 3)} – {fmt(ci[1], 3)}",
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
                    fmt(c.get("baseline_mape_pct")),
                    fmt(c.get("tonight_mape_pct")),
                    fmt(c.get("growth_pct"), 1),
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
                    [[k, *[fmt(cond[s].get(k), 2) for s in sides]] for k in keys],
                    "From each step's telemetry snapshot: what the machine was doing while the run measured.",
                )
            )
        for w in summary.get("warnings") or []:
            sec.add(Note(str(w)))
    if not history:
        sec.add(Note("No nightly history yet."))
        return sec
    fig = new_figure(13, 4.6)
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
            ax.plot(xs, ys, marker="o", markersize=4, color=palette(j), label=label)
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
        style_axes(ax)
    sec.add(
        Figure(
            f"{FIGURE_PREFIX}nightly-trend",
            png_bytes(fig),
            "Median latency per config over nights (one point per nightly run; red rings: flagged as a "
            "regression that night; green dotted lines: nights accepted as the baseline).",
        )
    )
    return sec
