"""Experiment 2: error per feature variant and reference model, from the typed comparison result."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from estimator.data.runs import PHASES
from estimator.report.document import (
    FIGURE_PREFIX,
    SECTIONS,
    Bullets,
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
from estimator.report.sections.intervals import repeated_blocks
from estimator.study.results import ComparisonResult

# ---------------------------------------------------------------- Experiment 2: variants


def _variants_table(scores: pd.DataFrame, models: Sequence[str], splits: Sequence[str], path: Path) -> Table:
    """One row per model: MAPE per split and phase, × noise floor and R² (by prompt), cost per prediction."""
    idx = scores.set_index(["split", "phase", "model"])

    def cell(split: str, phase: str, model: str, col: str, digits: int = 2) -> str:
        key = (split, phase, model)
        return fmt(idx.loc[key, col], digits) if key in idx.index and col in idx.columns else "–"

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


def variants_section(
    comparison: ComparisonResult | str | None, path: Path | None, run_ids: Sequence[str]
) -> tuple[Section, dict[str, Any]]:
    """Experiment 2 from its typed result (`path` is the compare.json it was read from; a string is why it could
    not be read)."""
    sec = Section("variants", SECTIONS["variants"])
    if comparison is None or path is None:
        sec.add(
            Note(
                "No compare/compare.json for this run: run `estimate compare RUN` to compare the feature "
                "variants (tokens, buckets, poly, embedding, residual) and the reference models on "
                "held-out prompts and held-out lengths."
            )
        )
        return sec, {}
    if isinstance(comparison, str):
        sec.add(Note(comparison))
        return sec, {}
    scores = pd.DataFrame([s.model_dump() for s in comparison.scores])
    if scores.empty:
        sec.add(Note(f"{path} holds no scores."))
        return sec, {}
    if sorted(comparison.runs) != sorted(run_ids):
        sec.add(Note(f"{path} was computed on runs {comparison.runs}, not exactly on the runs of this report."))
    splits = comparison.splits
    floors = {p: f.mape_pct if (f := comparison.noise_floor.get(p)) else None for p in PHASES}
    models = list(dict.fromkeys(scores["model"]))
    fig = new_figure(13, 5.0)
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
                color=split_colors.get(split, palette(j)),
                label=f"held out {split.replace('_', ' ')}",
            )
            ax.bar_label(bars, labels=[fmt(v, 1) for v in vals], fontsize=7, padding=1)
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
        style_axes(ax)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=3, fontsize=9, frameon=False)
    desc = "; ".join(f"{k}: {v}" for k, v in splits.items())
    sec.add(
        Figure(
            f"{FIGURE_PREFIX}variants",
            png_bytes(fig),
            f"One split, no interval: mean absolute percentage error per LightGBM variant and reference model, "
            f"on two held-out splits ({desc}). The repeated folds below carry the intervals and the verdict.",
        )
    )
    sec.add(_variants_table(scores, models, split_names, path))
    if comparison.repeated is not None:
        for block in repeated_blocks(comparison.repeated, path):
            sec.add(block)
    else:
        sec.add(Note(f"{path} has no repeated folds: every figure above comes from one split, without an interval."))
    lines = comparison.verdict.lines
    if lines:
        sec.add(Paragraph("Verdict (from `estimate compare`):"))
        sec.add(Bullets(lines))
    return sec, {"embedding_answer": comparison.verdict.embedding_answer}
