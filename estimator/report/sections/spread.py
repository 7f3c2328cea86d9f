"""Experiment 1: CV per text_tokens bin against the 10% / 15% bars and the noise floor."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from estimator.data.runs import PHASES, RunSet
from estimator.report.document import (
    FIGURE_PREFIX,
    SECTIONS,
    Bullets,
    Figure,
    Note,
    Section,
    Table,
)
from estimator.report.plots import (
    fmt,
    group_column,
    group_labels,
    new_figure,
    palette,
    png_bytes,
    style_axes,
)
from estimator.study.analyze import CV_INSUFFICIENT_PCT, CV_SUFFICIENT_PCT, Analysis

# ---------------------------------------------------------------- Experiment 1: CV per text_tokens bin

MAX_TEXT_TOKEN_BINS = 12


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


def spread_section(runset: RunSet, analysis: Analysis | str) -> tuple[Section, dict[str, Any]]:
    """CV across different prompts per text_tokens bin, against the 10% / 15% bars and the noise floor.

    `analysis` is Experiment 1's result, or the reason it could not run on these runs."""
    sec = Section("spread", SECTIONS["spread"])
    if isinstance(analysis, str):
        sec.add(Note(f"Experiment 1 could not run on these runs: {analysis}"))
        return sec, {}
    table = analysis.table.copy()
    group = group_column(runset)
    table["bin"], centers = _token_bins(table["text_tokens"])
    fig = new_figure(13, 5.2)
    axes = fig.subplots(1, 2, sharey=False)
    labels = group_labels(runset.samples, group)
    order = sorted(centers, key=lambda b: centers[b])
    rows_out: dict[str, list[str]] = {b: [b] for b in order}
    for ax, phase in zip(axes, PHASES, strict=True):
        d_col, s_col = f"{phase}_cv_distinct_pct", f"{phase}_cv_same_pct"
        for i, key in enumerate(labels):
            sub = table if group is None else table[table[group] == key]
            x = sub["bin"].map(centers) * (1.0 + 0.03 * (i - (len(labels) - 1) / 2))
            ax.scatter(
                x, sub[d_col], s=18, alpha=0.6, color=palette(i), edgecolors="none", label=f"{labels[key]}: one config"
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
        style_axes(ax)
        for b in order:
            rows_out[b] += [fmt(med_d[b], 1), fmt(med_s[b], 1)]
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    sec.add(
        Figure(
            f"{FIGURE_PREFIX}spread",
            png_bytes(fig),
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
