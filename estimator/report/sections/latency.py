"""Latency vs prompt length and KV position, per tier, with the closed-form fit (from the study)."""

from __future__ import annotations

import numpy as np

from estimator.data.runs import RunSet
from estimator.report.document import (
    FIGURE_PREFIX,
    SECTIONS,
    Figure,
    Section,
    Table,
)
from estimator.report.plots import (
    fmt_coef,
    group_labels,
    legend,
    log_ticks,
    new_figure,
    palette,
    png_bytes,
    style_axes,
)
from estimator.study.fits import LatencyFits

# ---------------------------------------------------------------- latency vs length / position


def latency_section(runset: RunSet, fits: LatencyFits) -> Section:
    """Prefill vs text_tokens and decode vs position, per tier, with the closed-form fit a + b·n + c·n²."""
    sec = Section("latency", SECTIONS["latency"])
    group = fits.group
    samples = runset.samples
    labels = group_labels(samples, group)
    pre, dec = runset.phase("prefill"), runset.phase("decode")
    cf_pre, cf_dec = fits.prefill, fits.decode
    fig = new_figure(13, 5.0)
    ax_p, ax_d = fig.subplots(1, 2)
    keys = list(labels)
    n_groups = len(keys)
    fit_rows: list[list[str]] = []
    hidden = 0
    dec_cap = float(np.percentile(dec["latency_ms"], 99.5)) * 1.15 if len(dec) else 1.0
    for i, key in enumerate(keys):
        color = palette(i)
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
                f"{fmt_coef(pc[0])} + {fmt_coef(pc[1])}·n + {fmt_coef(pc[2])}·n²",
                f"{fmt_coef(dc[0])} + {fmt_coef(dc[1])}·p",
                str(len(sel_p)),
                str(len(sel_d)),
            ]
        )
    ax_p.set_xscale("log", base=2)
    ax_p.set_yscale("log")
    log_ticks(ax_p, "y")
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
    legend(ax_d, fontsize=8, loc="upper left", frameon=False, markerscale=3)
    for ax in (ax_p, ax_d):
        style_axes(ax)
    note = f" {hidden} decode steps above {dec_cap:.1f} ms (outliers) lie outside the right panel." if hidden else ""
    sec.add(
        Figure(
            f"{FIGURE_PREFIX}latency",
            png_bytes(fig),
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
