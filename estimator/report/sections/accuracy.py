"""Predicted vs measured: held-out predictions of `estimate compare` and the chosen model on the run's rows."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from estimator.data.runs import PHASES, RunSet
from estimator.model.evaluation import error_metrics
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
    group_column,
    group_labels,
    legend,
    new_figure,
    palette,
    parity_axes,
    png_bytes,
    style_axes,
)
from estimator.study.scoring import ModelOnRuns

# ---------------------------------------------------------------- predicted vs measured


@dataclass
class _Evaluated:
    label: str
    frames: dict[str, pd.DataFrame]  # phase → latency_ms, predicted_ms, group column


def _scatter_pred(ev: _Evaluated, group: str | None, labels: Mapping[Any, str]) -> Any:
    fig = new_figure(13, 5.3)
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
                color=palette(i),
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
        parity_axes(ax, lo, hi)
        m = error_metrics(f["latency_ms"].to_numpy(), f["predicted_ms"].to_numpy())
        off = f", {outside} off the axes" if outside else ""
        ax.set_title(
            f"{phase.capitalize()}: MAPE {m['mape_pct']:.1f}%, R² {m['r2']:.3f} ({len(f)} rows{off})", fontsize=11
        )
        ax.set_xlabel(f"measured {phase} latency (ms, log scale)")
        ax.set_ylabel(f"predicted {phase} latency (ms, log scale)")
        legend(ax, fontsize=8, loc="upper left", frameon=False, markerscale=2)
        style_axes(ax)
    return fig


def _metric_row(source: str, phase: str, f: pd.DataFrame, floor: float) -> list[str]:
    m = error_metrics(f["latency_ms"].to_numpy(), f["predicted_ms"].to_numpy())
    ratio = m["mape_pct"] / floor if math.isfinite(floor) and floor > 0 else float("nan")
    return [
        source,
        phase,
        str(len(f)),
        fmt(m["r2"], 3),
        fmt(m["mae_ms"], 3),
        fmt(m["mape_pct"]),
        fmt(ratio),
        fmt(m["p90_ape_pct"]),
    ]


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


def accuracy_section(
    runset: RunSet,
    model: ModelOnRuns | None,
    held: pd.DataFrame | None,
    compare_dir: Path | None,
    floors: Mapping[str, float],
) -> tuple[Section, dict[str, Any]]:
    """Compare's held-out predictions (when present) and the chosen model on the run's rows (in-sample when it was
    trained on them), with error figures against the noise floor."""
    sec = Section("accuracy", SECTIONS["accuracy"])
    facts: dict[str, Any] = {}
    group = group_column(runset)
    labels = group_labels(runset.samples, group)
    rows: list[list[str]] = []
    est = model.estimator if model is not None else None
    model_dir = model.model_dir if model is not None else None
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
    if held is not None:
        frames: dict[str, pd.DataFrame] = {p: held[held["phase"] == p].reset_index(drop=True) for p in PHASES}
        ev = _Evaluated(f"Held out by prompt: {variant} refitted by estimate compare without the test prompts", frames)
        sec.add(
            Figure(
                f"{FIGURE_PREFIX}accuracy-held-out",
                png_bytes(_scatter_pred(ev, group, labels)),
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
                        fmt(m.get("r2"), 3),
                        fmt(m.get("mae_ms"), 3),
                        fmt(mape),
                        fmt(ratio),
                        fmt(m.get("p90_ape_pct")),
                    ]
                )
            facts["held_out_mape_pct"] = {p: m.get("mape_pct") for p, m in ho.metrics.items()}
        if model is None or model.frames is None:
            sec.add(Note(f"The model could not predict these rows: {model.error if model else '?'}"))
        else:
            frames = model.frames
            kind = facts["model_kind"]
            ev = _Evaluated(f"{kind.upper()}: model {model_dir.name} on every row of the run(s)", frames)
            sec.add(
                Figure(
                    f"{FIGURE_PREFIX}accuracy-model",
                    png_bytes(_scatter_pred(ev, group, labels)),
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
                "× noise floor: MAPE divided by the same-prompt leave-one-out MAPE, corrected for its small n "
                "(× sqrt((n−1)/n), docs/noise-floor.md). That floor comes from other rows than these, so the ratio "
                "is a rough yardstick; Experiment 2 gives it on the same held-out rows.",
            )
        )
    return sec, facts
