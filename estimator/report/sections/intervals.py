"""Experiment 2 over repeated folds, from the typed `RepeatedResult`: MAPE with 95% error bars per learner × variant
and reference, one panel per held-out question and phase, the paired differences against tokens with the
rule's decision, and the noise floor on the same held-out rows. Renders only; nothing is fitted here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from estimator.data.runs import PHASES
from estimator.report.document import FIGURE_PREFIX, Bullets, Figure, Note, Paragraph, Table
from estimator.report.plots import fmt, new_figure, palette, png_bytes, style_axes
from estimator.study.results import CellResult, IntervalResult, RepeatedResult

QUESTION_TITLES = {
    "by_prompt": "held out by prompt",
    "by_length": "unseen length inside the range",
    "longer": "longer prompts (extrapolation)",
}
LEARNER_ORDER = ("lightgbm", "ridge", "spline")


def _iv_text(iv: IntervalResult | None, digits: int = 1) -> str:
    if iv is None or iv.mean is None:
        return "–"
    if iv.low is None or iv.high is None:
        return fmt(iv.mean, digits)
    return f"{fmt(iv.mean, digits)} [{fmt(iv.low, digits)}, {fmt(iv.high, digits)}]"


def _models(cells: list[CellResult]) -> list[str]:
    variants = [c.model for c in cells if c.kind == "variant"]
    refs = [c.model for c in cells if c.kind == "reference"]
    return list(dict.fromkeys(variants + refs))


def _figure(res: RepeatedResult) -> Figure:
    """Rows = phases, columns = questions; per model a dot at the mean MAPE with its 95% interval as an error
    bar, on a log axis (extrapolation errors span decades); the corrected noise floor on the same rows shaded."""
    questions = list(res.questions)
    models = _models(res.cells)
    fig = new_figure(4.6 * len(questions), 0.28 * len(models) * 2 + 2.0)
    axes = np.atleast_2d(fig.subplots(len(PHASES), len(questions), squeeze=False))
    by_key = {(c.question, c.phase, c.model): c for c in res.cells}
    floors = {(f.question, f.phase): f.corrected_mape_pct for f in res.noise_floor}
    y = np.arange(len(models))[::-1]
    colors = {lr: palette(i) for i, lr in enumerate(LEARNER_ORDER)}
    for r, phase in enumerate(PHASES):
        for c, question in enumerate(questions):
            ax = axes[r, c]
            floor = floors.get((question, phase))
            if floor is not None and floor.mean is not None:
                lo, hi = floor.low if floor.low is not None else floor.mean, floor.high or floor.mean
                ax.axvspan(max(lo, 1e-3), max(hi, 1e-3), color="#bbbbbb", alpha=0.5, lw=0)
                ax.axvline(floor.mean, color="black", ls="--", lw=1.0)
            for yi, m in zip(y, models, strict=True):
                cell = by_key.get((question, phase, m))
                if cell is None or cell.mape_pct.mean is None:
                    continue
                mean = cell.mape_pct.mean
                lo = cell.mape_pct.low if cell.mape_pct.low is not None else mean
                hi = cell.mape_pct.high if cell.mape_pct.high is not None else mean
                color = colors.get(cell.learner, "#444444")
                marker = "s" if cell.kind == "reference" else ("o" if not cell.by_construction else "x")
                ax.errorbar(
                    mean, yi, xerr=[[max(mean - max(lo, 1e-3), 0)], [max(hi - mean, 0)]], fmt=marker, color=color,
                    ms=4, capsize=2, lw=1,
                )
            ax.set_xscale("log")
            ax.set_title(f"{phase}: {QUESTION_TITLES.get(question, question)}", fontsize=10)
            ax.set_yticks(y)
            ax.set_yticklabels(models if c == 0 else [], fontsize=8)
            ax.set_ylim(-0.7, len(models) - 0.3)
            if r == len(PHASES) - 1:
                ax.set_xlabel("MAPE (%), 95% interval")
            style_axes(ax)
    return Figure(
        f"{FIGURE_PREFIX}variants-intervals",
        png_bytes(fig),
        "Held-out MAPE per learner × feature variant and reference model, with 95% intervals (over "
        f"{res.k} folds × {res.seeds} seeds by prompt; one fold per inner length; prompts resampled where there "
        "are fewer than 3 folds). Grey band and dashed line: the noise floor on the same held-out rows (corrected "
        "leave-one-out). Colours: LightGBM blue, ridge orange, spline green; squares: references; crosses: "
        "identical to tokens by construction.",
    )


def repeated_blocks(res: RepeatedResult, path: Path) -> list[Figure | Table | Paragraph | Bullets | Note]:
    """The blocks of the repeated-folds part of the Experiment 2 section."""
    blocks: list[Figure | Table | Paragraph | Bullets | Note] = []
    blocks.append(
        Paragraph(
            "Repeated grouped evaluation: "
            + "; ".join(f"{QUESTION_TITLES.get(q, q)}: {d}" for q, d in res.questions.items())
            + f". Rule: {res.rule}."
        )
    )
    blocks.append(_figure(res))
    rows = []
    for c in res.cells:
        rows.append(
            [
                QUESTION_TITLES.get(c.question, c.question),
                c.phase,
                c.model,
                _iv_text(c.mape_pct, 2),
                _iv_text(c.r2, 3),
                _iv_text(c.mae_ms, 3),
                _iv_text(c.p90_ape_pct, 1),
                fmt(c.mape_vs_noise_floor, 2),
                "by construction" if c.by_construction else "",
            ]
        )
    blocks.append(
        Table(
            ["question", "phase", "model", "MAPE % [95%]", "R² [95%]", "MAE ms [95%]", "p90 APE % [95%]",
             "× floor (same rows)", "note"],
            rows,
            f"Every figure with its 95% interval; × floor = MAPE on the same-prompt repeat rows of the held-out folds "
            f"over the corrected noise floor on those rows (docs/noise-floor.md). All of it is in {path}.",
        )
    )
    prow = [
        [
            QUESTION_TITLES.get(p.question, p.question),
            p.phase,
            p.model,
            p.baseline,
            _iv_text(p.improvement_pct, 1),
            p.decision + (" (by construction)" if p.by_construction else ""),
            fmt(p.prompts_per_point_needed, 0) if p.prompts_per_point_needed else "–",
        ]
        for p in res.paired
    ]
    blocks.append(
        Table(
            ["question", "phase", "model", "vs", "MAPE reduction % [95%]", "decision", "prompts/point to decide"],
            prow,
            f"Paired differences on the same folds (now {res.prompts_per_point:.1f} prompts per point).",
        )
    )
    frow = [
        [
            QUESTION_TITLES.get(f.question, f.question),
            f.phase,
            _iv_text(f.raw_mape_pct, 2),
            _iv_text(f.corrected_mape_pct, 2),
            ", ".join(str(n) for n in f.repeats),
            str(f.rows),
        ]
        for f in res.noise_floor
    ]
    if frow:
        blocks.append(
            Table(
                ["question", "phase", "raw leave-one-out MAPE %", "corrected MAPE %", "repeats n", "rows"],
                frow,
                "Noise floor on the held-out rows: each same-prompt repeat predicted by the mean of the others; "
                "corrected = each error × sqrt((n−1)/n), the error of the true mean.",
            )
        )
    return blocks
