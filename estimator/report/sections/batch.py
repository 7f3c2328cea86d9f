"""Batch level: is an iteration's token total enough (the feature-set study), and the iteration model on
workloads it never saw (predicted vs measured per iteration, coloured by batch size)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from estimator.report.document import FIGURE_PREFIX, SECTIONS, Bullets, Figure, Note, Paragraph, Section, Table
from estimator.report.plots import fmt, legend, new_figure, palette, parity_axes, png_bytes, style_axes
from estimator.study.batch import BatchStudyResult, ValidationResult

BATCH_BINS = ((1, 1), (2, 3), (4, 7), (8, 10**9))


def _iv(iv: object) -> str:
    mean, low, high = (getattr(iv, k, None) for k in ("mean", "low", "high"))
    return f"{fmt(mean, 1)} [{fmt(low, 1)}, {fmt(high, 1)}]"


def batch_section(
    study: BatchStudyResult | None,
    validations: list[tuple[ValidationResult, pd.DataFrame]],
) -> Section:
    sec = Section("batch", SECTIONS["batch"])
    if study is None:
        sec.add(Note("No batch study: run `estimate batch RUN` on a batch run (`profile replay` or a batch sweep)."))
    else:
        sec.add(
            Paragraph(
                f"Feature sets for one engine iteration's latency, on {study.iterations} iterations in "
                f"{study.segments} segments ({study.folds} folds grouped by segment × {study.seeds} seeds). MAPE % "
                "with its 95% interval; reduction = paired relative MAPE reduction against `totals` (Σ prefill "
                "tokens, number of decodes) with the same learner, and the notes' rule on that interval."
            )
        )
        rows = [
            [
                s.feature_set,
                s.learner,
                _iv(s.mape_pct),
                _iv(s.improvement_pct) if s.improvement_pct else "–",
                s.decision or "(baseline)",
            ]
            for s in study.scores
        ]
        sec.add(Table(["feature set", "learner", "MAPE %", "reduction vs totals %", "verdict"], rows))
        sec.add(Bullets(study.lines))
    if not validations:
        sec.add(Note("No validation: run `estimate validate RUN --model MODEL` on replays the model never saw."))
        return sec
    fig = new_figure(13, 5.0)
    axes = np.atleast_1d(fig.subplots(1, len(validations)))
    rows = []
    for ax, (v, frame) in zip(axes, validations, strict=True):
        size = frame["num_prefill_seqs"] + frame["num_decode_seqs"]
        for i, (lo, hi) in enumerate(BATCH_BINS):
            sub = frame[(size >= lo) & (size <= hi)]
            if len(sub):
                label = f"batch {lo}" if lo == hi else f"batch {lo}–{hi}" if hi < 10**9 else f"batch ≥ {lo}"
                ax.scatter(
                    sub["latency_ms"],
                    sub["predicted_ms"],
                    s=6,
                    alpha=0.4,
                    color=palette(i),
                    edgecolors="none",
                    rasterized=True,
                    label=label,
                )
        both = np.concatenate([frame["latency_ms"].to_numpy(), frame["predicted_ms"].to_numpy()])
        lo_v, hi_v = float(np.percentile(both, 0.5)) * 0.85, float(np.percentile(both, 99.5)) * 1.15
        parity_axes(ax, lo_v, hi_v)
        ax.set_title(
            f"{', '.join(v.runs)}: MAPE {v.iteration_mape_pct:.1f}% (floor {fmt(v.noise_floor_mape_pct, 1)}%)",
            fontsize=10,
        )
        ax.set_xlabel("measured iteration latency (ms, log scale)")
        ax.set_ylabel("predicted iteration latency (ms, log scale)")
        legend(ax, fontsize=8, loc="upper left", frameon=False, markerscale=2)
        style_axes(ax)
        rows.append(
            [
                ", ".join(v.runs),
                str(v.iterations),
                str(v.requests),
                fmt(v.iteration_mape_pct),
                fmt(v.noise_floor_mape_pct),
                fmt(v.ratio_to_floor),
                fmt(v.ttft_mape_pct),
                fmt(v.e2e_mape_pct),
                ", ".join(f"{b}: {x:.1f}" for b, x in v.mape_by_batch_size.items()),
            ]
        )
    sec.add(
        Figure(
            f"{FIGURE_PREFIX}batch-validation",
            png_bytes(fig),
            "The iteration model on replays it never saw: each point one engine iteration, coloured by how many "
            "sequences it held.",
        )
    )
    sec.add(
        Table(
            [
                "workload",
                "iterations",
                "requests",
                "iteration MAPE %",
                "noise floor %",
                "× floor",
                "TTFT MAPE %",
                "end-to-end MAPE %",
                "MAPE % by batch size",
            ],
            rows,
            validations[0][0].method,
        )
    )
    kind_rows = [
        [", ".join(v.runs), kind, str(int(e["iterations"])), fmt(e["mape_pct"]), f"{e['signed_pct']:+.1f}"]
        for v, _ in validations
        for kind, e in v.by_kind.items()
    ]
    if kind_rows:
        sec.add(
            Table(
                ["workload", "iteration kind", "iterations", "MAPE %", "mean signed error %"],
                kind_rows,
                "The error by iteration kind: a prefill alone, a prefill sharing the iteration with decodes, decodes "
                "alone (positive: over-predicted).",
            )
        )
    return sec
