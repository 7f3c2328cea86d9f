"""Figure and formatting helpers shared by the report's sections (matplotlib's Agg canvas directly: no pyplot,
no global backend switch)."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from estimator.data.runs import RunSet

DPI = 100
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


# ---------------------------------------------------------------- small helpers


def fmt(v: Any, digits: int = 2) -> str:
    """A number for a table cell: fixed digits, '–' for missing."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "–" if v is None else str(v)
    if not math.isfinite(x):
        return "–"
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def fmt_coef(v: float, digits: int = 3) -> str:
    """A coefficient: significant digits, scientific notation for tiny values."""
    if not math.isfinite(v):
        return "–"
    return f"{v:.{digits}g}"


def plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def new_figure(width_in: float, height_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def style_axes(ax: Any) -> None:
    ax.grid(True, which="major", alpha=0.3, linewidth=0.6)
    ax.tick_params(labelsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def log_ticks(ax: Any, which: str = "both", subs: tuple[float, ...] = (1.0, 2.0, 5.0)) -> None:
    """Log axes labelled with plain numbers at `subs` × 10^k (not 10^1 or 2×10^0)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes = {"x": [ax.xaxis], "y": [ax.yaxis], "both": [ax.xaxis, ax.yaxis]}[which]
    for axis in axes:
        axis.set_major_locator(LogLocator(base=10, subs=subs))
        axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def legend(ax: Any, **kwargs: Any) -> None:
    """A legend whose markers are opaque even when the points are drawn faint."""
    from matplotlib.collections import PathCollection

    leg = ax.legend(**kwargs)
    for handle in leg.legend_handles:
        if isinstance(handle, PathCollection):
            handle.set_alpha(1.0)


def group_column(runset: RunSet) -> str | None:
    """The axis that names the model size: `tier` where the run has it, else the first config column."""
    if "tier" in runset.samples.columns:
        return "tier"
    return runset.config_columns[0] if runset.config_columns else None


def group_labels(samples: pd.DataFrame, group: str | None) -> dict[Any, str]:
    if group is None:
        return {None: "all"}
    labels: dict[Any, str] = {}
    for value, sub in samples.groupby(group, sort=True):
        models = sorted({str(m) for m in sub["model"].unique()}) if "model" in sub.columns else []
        name = f"{group} {plain(value)}"
        labels[plain(value)] = f"{name} · {' / '.join(models)}" if models and group != "model" else name
    return labels


def palette(i: int) -> str:
    return COLORS[i % len(COLORS)]


def config_text(config: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items() if k not in set(skip))


def parity_axes(ax: Any, lo: float, hi: float) -> None:
    """Predicted-vs-measured axes: log scales over [lo, hi] (ms), the identity line and a ±10% band."""
    line = np.geomspace(lo, hi, 50)
    ax.plot(line, line, color="black", linewidth=1, label="predicted = measured")
    ax.fill_between(line, line * 0.9, line * 1.1, color="gray", alpha=0.15, label="±10%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    log_ticks(ax)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
