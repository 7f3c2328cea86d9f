"""The nightly trend: median latency per config over nights, and tonight against the baseline."""

from __future__ import annotations

from collections.abc import Sequence

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
from estimator.study.changepoints import MIN_SIZE, PENALTY_K, history_change_points
from estimator.study.nightly_results import HistoryLine, NightlySummary

# ---------------------------------------------------------------- nightly trend


def nightly_section(history: Sequence[HistoryLine], summary: NightlySummary | None) -> Section:
    """Median latency per config and phase over nights, and tonight's comparison against the baseline."""
    sec = Section("nightly", SECTIONS["nightly"])
    if summary:
        status = "REGRESSION FLAGGED" if summary.regression else "no regression"
        base = summary.baseline_run_id or "none (tonight accepted as the first baseline)"
        sec.add(Paragraph(f"Tonight `{summary.run_id}` vs baseline `{base}`: **{status}**. {summary.rule}"))
        rows = []
        for c in summary.comparisons:
            again = c.confirm
            low, high = again.ci if again and again.ci else (None, None)
            rerun = f"{fmt(again.ratio, 3)} ({fmt(low, 3)} – {fmt(high, 3)})" if again else "–"
            rows.append(
                [
                    c.label,
                    c.phase,
                    fmt(c.baseline_median_ms, 2),
                    fmt(c.tonight_median_ms, 2),
                    fmt(c.ratio, 3),
                    f"{fmt(c.ci[0], 3)} – {fmt(c.ci[1], 3)}",
                    c.requests,
                    rerun,
                    "FLAGGED" if c.flagged else "improved" if c.improved else "ok",
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
        inter = (summary.interleaved or {}).get("verdicts") or []
        if inter:
            sec.add(
                Table(
                    ["config", "phase", "ratio", "95% CI", "rounds", "canary-normalized ratio (95% CI)", "status"],
                    [
                        [
                            v["label"],
                            v["phase"],
                            fmt(v["ratio"], 3),
                            f"{fmt(v['ci'][0], 3)} – {fmt(v['ci'][1], 3)}",
                            ", ".join(fmt(r, 3) for r in v["round_ratios"]),
                            "–" if v["normalized_ratio"] is None else f"{fmt(v['normalized_ratio'], 3)} "
                            f"({fmt(v['normalized_ci'][0], 3)} – {fmt(v['normalized_ci'][1], 3)})",
                            "FLAGGED" if v["flagged"] else "ok",
                        ]
                        for v in inter
                    ],
                    "Interleaved night (estimator/nightly/interleave.py): the accepted settings and tonight's, "
                    "alternating in random order, each a fresh engine start; ratio: the geometric mean over rounds "
                    "of each round's median ratio; CI: bootstrap over rounds, then requests. These flags decide.",
                )
            )
        mape_rows = [
            [m.phase, fmt(m.baseline_mape_pct), fmt(m.tonight_mape_pct), fmt(m.growth_pct, 1),
             "FLAGGED" if m.flagged else "ok"]
            for m in summary.estimator_checks
        ]
        if mape_rows:
            sec.add(
                Table(
                    ["phase", "baseline held-out MAPE %", "tonight held-out MAPE %", "growth %", "status"],
                    mape_rows,
                    "Estimator's held-out (by prompt) error, from each night's model meta.json.",
                )
            )
        cond = summary.conditions
        keys = sorted({k for side in cond.values() for k in side})
        if keys:
            sides = [s for s in ("baseline", "tonight") if s in cond]
            sec.add(
                Table(
                    ["measuring conditions (median over steps)", *sides],
                    [[k, *[fmt(cond[s].get(k), 2) for s in sides]] for k in keys],
                    "From each step's telemetry snapshot: what the machine was doing while the run measured.",
                )
            )
        limit_rows = [
            [c.label, c.phase, str(c.history.get("nights", 0)), fmt(c.history.get("center_ms"), 2),
             fmt(c.history.get("limit_ratio"), 3), fmt(c.history.get("ratio_to_center"), 3),
             "beyond" if c.history.get("beyond_limit") else "within"]
            for c in summary.comparisons
            if c.history and c.history.get("center_ms")
        ]
        if limit_rows:
            sec.add(
                Table(
                    ["config", "phase", "accepted nights", "centre ms", "upper limit (× centre)", "tonight / centre",
                     "tonight"],
                    limit_rows,
                    "Control limits from the accepted nights (estimator/nightly/control.py): a bootstrap flag "
                    "stands only where tonight's median is also beyond the upper limit.",
                )
            )
        for w in summary.warnings:
            sec.add(Note(w))
    if not history:
        sec.add(Note("No nightly history yet."))
        return sec
    changes = history_change_points(history)
    fig = new_figure(13, 4.6)
    axes = fig.subplots(1, 2)
    nights = [h.run_id for h in history]
    for ax, phase in zip(axes, PHASES, strict=True):
        series: dict[str, list[tuple[int, float, bool]]] = {}
        for i, h in enumerate(history):
            for m in h.medians:
                if m.phase == phase:
                    series.setdefault(m.label, []).append((i, m.median_ms, m.flagged))
        for j, (label, pts) in enumerate(sorted(series.items())):
            xs, ys, fl = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", markersize=4, color=palette(j), label=label)
            bad = [(x, y) for x, y, f in pts if f]
            if bad:
                bx, by = zip(*bad, strict=True)
                ax.scatter(bx, by, s=120, facecolors="none", edgecolors="#d62728", linewidths=2, zorder=5)
        for i, h in enumerate(history):
            if h.accepted:
                ax.axvline(i, color="#2ca02c", linestyle=":", linewidth=1.2)
        colour = {label: palette(j) for j, label in enumerate(sorted(series))}
        at = {h.run_id: i for i, h in enumerate(history)}
        for cp in changes:
            if cp.phase == phase and cp.label in colour and cp.run_id in at:
                x = at[cp.run_id]
                ax.axvline(x - 0.5, color=colour[cp.label], linestyle="-.", linewidth=1.4, alpha=0.9)
                ax.annotate(f"×{cp.ratio:.2f}", (x - 0.45, 0.5), xycoords=("data", "axes fraction"), fontsize=8,
                            color=colour[cp.label])
        for c in summary.comparisons if summary else []:
            lim = c.history or {}
            if c.phase == phase and c.label in colour and lim.get("center_ms") and lim.get("limit_ratio"):
                centre = float(lim["center_ms"])
                ax.axhline(centre, color=colour[c.label], linestyle=":", linewidth=1.0, alpha=0.8)
                ax.axhline(centre * float(lim["limit_ratio"]), color=colour[c.label], linestyle="--", linewidth=1.0)
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
            "regression that night; green dotted lines: nights accepted as the baseline). A control chart: "
            "per config, the centre of the accepted nights (dotted) and tonight's upper control limit (dashed). "
            "Dash-dot lines: change points over all nights (estimator/study/changepoints.py), labelled with the new "
            "level / the old.",
        )
    )
    if changes:
        sec.add(Table(["config", "phase", "from night", "before ms", "after ms", "after / before"],
                      [[c.label, c.phase, c.run_id, fmt(c.before_ms, 2), fmt(c.after_ms, 2), fmt(c.ratio, 3)]
                       for c in changes],
                      "Change points: PELT (least absolute deviation) on the log medians of every night, a segment "
                      f"at least {MIN_SIZE} nights long (a change is confirmed by its second night), penalty "
                      f"{PENALTY_K:g}·σ·ln(n) with σ the series' own night-to-night noise."))
    if any(m.canary_ms for h in history for m in h.medians):
        normalized = history_change_points(history, normalized=True)
        sec.add(
            Table(
                ["config", "phase", "from night", "after / before"],
                [[c.label, c.phase, c.run_id, fmt(c.ratio, 3)] for c in normalized],
                "Change points of the canary-normalized medians (each night's median / its CPU canary, nights "
                "timed with one): a change of the machine moves both and leaves these; an engine change does not. "
                + ("" if normalized else "None found."),
            )
        )
    return sec
