"""LightGBM feature importance of the chosen model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from estimator.data.runs import PHASES
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
    new_figure,
    png_bytes,
    style_axes,
)

# ---------------------------------------------------------------- feature importance


def importance_section(model_dir: Path | None, imp: Mapping[str, pd.Series] | None) -> Section:
    """Gain importance per phase (`estimator.model.importance.feature_importance` of `model_dir`)."""
    sec = Section("importance", SECTIONS["importance"])
    if model_dir is None or imp is None:
        sec.add(
            Note(
                "No model given: pass `--model models/NAME` to see which features the LightGBM trees split "
                "on (gain importance)."
            )
        )
        return sec
    phases = [p for p in PHASES if p in imp] + [p for p in imp if p not in PHASES]
    fig = new_figure(13, 1.6 + 0.32 * max(len(s) for s in imp.values()))
    axes = np.atleast_1d(fig.subplots(1, len(phases)))
    for ax, phase in zip(axes, phases, strict=True):
        s = imp[phase]
        bars = ax.barh(list(s.index), s.to_numpy(), color="#1f77b4")
        ax.bar_label(bars, labels=[f"{v:.1f}%" for v in s.to_numpy()], fontsize=8, padding=2)
        ax.set_xlabel("share of total split gain (%)")
        ax.set_title(f"{phase.capitalize()} model", fontsize=11)
        ax.set_xlim(0, max(100.0, float(s.max()) * 1.15))
        style_axes(ax)
    sec.add(
        Figure(
            f"{FIGURE_PREFIX}importance",
            png_bytes(fig),
            f"LightGBM gain importance of `{model_dir}` (how much each feature reduced the training loss, "
            "summed over all splits). Gain on log latency; shares, not effect sizes.",
        )
    )
    names = sorted({n for s in imp.values() for n in s.index})
    rows = [[n, *[fmt(imp[p].get(n), 1) for p in phases]] for n in names]
    rows.sort(key=lambda r: -max(float(v) if v != "–" else 0.0 for v in r[1:]))
    sec.add(Table(["feature", *[f"{p} gain %" for p in phases]], rows))
    return sec
