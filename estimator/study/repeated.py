"""Experiment 2 over repeated grouped folds: learners × variants and the references on three held-out questions,
every figure with a 95% interval, paired differences against tokens, and the noise floor on the same rows.

`evaluate_repeated` works on plain per-phase frames (no run folders), so tests can feed it synthetic data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from estimator.model.closed_form import ClosedForm, model_group
from estimator.model.embedding import EmbeddingCache
from estimator.model.evaluation import error_metrics
from estimator.model.features import Phase
from estimator.model.train import EmbeddingContext, subsample
from estimator.study.analyze import loo_ape_pct, loo_mask
from estimator.study.folds import QUESTION_TEXT, Fold, all_folds
from estimator.study.intervals import (
    MIN_FOLDS_FOR_T,
    NOT_WORTH_PCT,
    WORTH_IT_PCT,
    Interval,
    bootstrap_interval,
    corrected_t_interval,
    decide,
)
from estimator.study.learners import (
    BY_CONSTRUCTION,
    BY_CONSTRUCTION_NOTE,
    LEARNERS,
    REFERENCE_MODELS,
    FoldData,
    fit_predict,
    model_name,
)
from estimator.study.results import (
    CellResult,
    HeldOutFloorResult,
    IntervalResult,
    PairedResult,
    RepeatedResult,
)

PHASES: tuple[Phase, ...] = ("prefill", "decode")
METRICS = ("mape_pct", "r2", "mae_ms", "p90_ape_pct")
PRODUCT = "lightgbm:tokens"


@dataclass(frozen=True)
class RepeatedSpec:
    """How many folds and seeds, which learners and variants, the decode training-row cap per fold."""

    k: int = 5
    seeds: int = 3
    variants: Sequence[str] = ("tokens", "buckets", "poly", "embedding", "residual")
    learners: Sequence[str] = LEARNERS
    references: bool = True
    max_decode_rows: int = 3000
    test_fraction: float = 0.25
    n_boot: int = 400


@dataclass
class _Fits:
    """Per (question, phase, model): per-fold metrics and, for bootstrap questions, the pooled test rows."""

    metrics: list[dict[str, float]] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)  # n_test / n_train per fold
    floor_rows_mape: list[float] = field(default_factory=list)
    y: list[np.ndarray] = field(default_factory=list)
    yhat: list[np.ndarray] = field(default_factory=list)
    groups: list[np.ndarray] = field(default_factory=list)
    identical: bool = True
    train_s: float = 0.0


def _floor_keys(config_columns: Sequence[str], phase: str, frame: pd.DataFrame) -> list[str]:
    keys = [c for c in ("run_id", *config_columns, "text_tokens", "prompt_id") if c in frame.columns]
    return keys + (["step_index"] if phase == "decode" and "step_index" in frame.columns else [])


def evaluate_repeated(
    frames: Mapping[Phase, pd.DataFrame],
    axes: Sequence[str],
    categories: Mapping[str, Sequence[str]],
    config_columns: Sequence[str],
    spec: RepeatedSpec,
    cache: EmbeddingCache | None = None,
    progress: Callable[[str], None] | None = None,
) -> RepeatedResult:
    """Every learner × variant and reference on every fold of the three questions; intervals and verdict."""
    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    folds = all_folds(frames, spec.k, spec.seeds, spec.test_fraction)
    variants = list(dict.fromkeys(["tokens", *spec.variants]))
    cells = [(lr, v) for lr in spec.learners for v in variants]
    refs = list(REFERENCE_MODELS) if spec.references else []
    fits: dict[tuple[str, str, str], _Fits] = {}
    floors: dict[tuple[str, str], dict[str, list]] = {}
    group = model_group(axes)
    for question, qfolds in folds.items():
        for fold in qfolds:
            say(f"  {question}: {fold.label}")
            _run_fold(frames, fold, axes, categories, config_columns, group, cells, refs, spec, cache,
                      len(qfolds) < MIN_FOLDS_FOR_T, fits, floors)
    pre = frames["prefill"]
    points = pre[[c for c in ("run_id", "point_id") if c in pre.columns]].drop_duplicates()
    ppp = pre["prompt_id"].nunique() / max(len(points), 1)
    result = _summarise(folds, fits, floors, cells, refs, spec, ppp)
    result.timings_s = {"repeated_s": time.perf_counter() - t_start}
    return result


def _run_fold(
    frames: Mapping[Phase, pd.DataFrame],
    fold: Fold,
    axes: Sequence[str],
    categories: Mapping[str, Sequence[str]],
    config_columns: Sequence[str],
    group: str | None,
    cells: Sequence[tuple[str, str]],
    refs: Sequence[str],
    spec: RepeatedSpec,
    cache: EmbeddingCache | None,
    keep_rows: bool,
    fits: dict[tuple[str, str, str], _Fits],
    floors: dict[tuple[str, str], dict[str, list]],
) -> None:
    train = {p: frames[p].iloc[fold.train[p]].reset_index(drop=True) for p in PHASES}
    train["decode"] = subsample(train["decode"], spec.max_decode_rows, fold.seed * 1000 + fold.index)
    test = {p: frames[p].iloc[fold.test[p]].reset_index(drop=True) for p in PHASES}
    ctx = None
    if any(v == "embedding" for _, v in cells):
        ctx = EmbeddingContext.fit(list(train.values()), cache or EmbeddingCache())
    for phase in PHASES:
        tr, te = train[phase], test[phase]
        data = FoldData(
            phase=phase,
            axes=axes,
            categories=categories,
            config_columns=config_columns,
            closed=ClosedForm(phase, axes, config_columns).fit(tr),
            physics=ClosedForm(phase, axes, config_columns, group_column=group).fit(tr),
            ctx=ctx,
            seed=fold.seed,
        )
        y = te["latency_ms"].to_numpy(dtype=np.float64)
        fl = floors.setdefault((fold.question, phase), {"raw": [], "corrected": [], "rows": [], "repeats": []})
        same = (te["prompt_kind"] == "same").to_numpy() if "prompt_kind" in te.columns else np.zeros(len(te), bool)
        keys = _floor_keys(config_columns, phase, te)
        floor_mask = np.zeros(len(te), dtype=bool)
        if same.any():
            sub = te[same]
            m = loo_mask(sub, keys)
            floor_mask[np.flatnonzero(same)[m]] = True
            if m.any():
                fl["raw"].append(float(np.mean(loo_ape_pct(sub, keys))))
                fl["corrected"].append(float(np.mean(loo_ape_pct(sub, keys, corrected=True))))
                fl["rows"].append(int(m.sum()))
                fl["repeats"] += sorted({int(v) for v in sub.groupby(keys).size() if v >= 2})
        preds: dict[str, np.ndarray] = {}
        for learner, variant in [*cells, *((r, "-") for r in refs)]:
            name = model_name(learner, variant) if variant != "-" else learner
            t0 = time.perf_counter()
            yhat = fit_predict(learner, variant, tr, te, data)
            f = fits.setdefault((fold.question, phase, name), _Fits())
            f.train_s += time.perf_counter() - t0
            preds[name] = yhat
            scores = error_metrics(y, yhat)
            f.metrics.append({k: scores[k] for k in METRICS})
            f.ratio.append(len(te) / max(len(tr), 1))
            ape = np.abs(yhat - y) / y * 100.0
            f.floor_rows_mape.append(float(ape[floor_mask].mean()) if floor_mask.any() else float("nan"))
            if variant not in ("-", "tokens"):
                f.identical &= bool(np.array_equal(yhat, preds[model_name(learner, "tokens")]))
            if keep_rows:
                f.y.append(y)
                f.yhat.append(yhat)
                f.groups.append(te["prompt_id"].astype(str).to_numpy())


def _iv(i: Interval) -> IntervalResult:
    return IntervalResult.model_validate(i.as_dict())


def _metric(y: np.ndarray, yhat: np.ndarray, name: str) -> float:
    return float(error_metrics(y, yhat)[name]) if len(y) else float("nan")


def _cell_intervals(f: _Fits, spec: RepeatedSpec) -> dict[str, Interval]:
    if len(f.metrics) >= MIN_FOLDS_FOR_T:
        ratio = float(np.mean(f.ratio))
        return {k: corrected_t_interval([m[k] for m in f.metrics], ratio) for k in METRICS}
    y, yhat, g = np.concatenate(f.y), np.concatenate(f.yhat), np.concatenate(f.groups)
    return {
        k: bootstrap_interval(lambda idx, k=k: _metric(y[idx], yhat[idx], k), g, spec.n_boot)  # type: ignore[misc]
        for k in METRICS
    }


def _improvement(f: _Fits, base: _Fits, spec: RepeatedSpec) -> Interval:
    if len(f.metrics) >= MIN_FOLDS_FOR_T:
        rel = [
            (b["mape_pct"] - m["mape_pct"]) / b["mape_pct"] * 100.0
            for m, b in zip(f.metrics, base.metrics, strict=True)
        ]
        return corrected_t_interval(rel, float(np.mean(f.ratio)))
    y, yhat, yb = np.concatenate(f.y), np.concatenate(f.yhat), np.concatenate(base.yhat)
    g = np.concatenate(f.groups)

    def stat(idx: np.ndarray) -> float:
        mb = float(np.mean(np.abs(yb[idx] - y[idx]) / y[idx]))
        mv = float(np.mean(np.abs(yhat[idx] - y[idx]) / y[idx]))
        return (mb - mv) / mb * 100.0 if mb > 0 else float("nan")

    return bootstrap_interval(stat, g, spec.n_boot)


def _summarise(
    folds: Mapping[str, Sequence[Fold]],
    fits: Mapping[tuple[str, str, str], _Fits],
    floors: Mapping[tuple[str, str], Mapping[str, list]],
    cells: Sequence[tuple[str, str]],
    refs: Sequence[str],
    spec: RepeatedSpec,
    prompts_per_point: float,
) -> RepeatedResult:
    cell_out: list[CellResult] = []
    paired: list[PairedResult] = []
    floor_out: list[HeldOutFloorResult] = []
    lines: list[str] = []
    for question in folds:
        for phase in PHASES:
            fl = floors.get((question, phase), {})
            raw = corrected_t_interval(fl.get("raw", []), 0.0) if fl.get("raw") else None
            cor = corrected_t_interval(fl.get("corrected", []), 0.0) if fl.get("corrected") else None
            if raw is not None and cor is not None:
                floor_out.append(
                    HeldOutFloorResult(
                        question=question,
                        phase=phase,
                        raw_mape_pct=_iv(raw),
                        corrected_mape_pct=_iv(cor),
                        rows=int(sum(fl["rows"])),
                        repeats=sorted(set(fl["repeats"])),
                    )
                )
            floor_mean = cor.mean if cor is not None else float("nan")
            for learner, variant in [*cells, *((r, "-") for r in refs)]:
                name = model_name(learner, variant) if variant != "-" else learner
                f = fits.get((question, phase, name))
                if f is None:
                    continue
                iv = _cell_intervals(f, spec)
                on_floor = float(np.nanmean(f.floor_rows_mape)) if np.isfinite(f.floor_rows_mape).any() else None
                construct = (learner, variant) in BY_CONSTRUCTION
                cell_out.append(
                    CellResult(
                        question=question,
                        phase=phase,
                        model=name,
                        learner=learner,
                        variant=variant if variant != "-" else "reference",
                        kind="variant" if variant != "-" else "reference",
                        folds=len(f.metrics),
                        **{k: _iv(iv[k]) for k in METRICS},
                        mape_on_floor_rows_pct=on_floor,
                        mape_vs_noise_floor=on_floor / floor_mean
                        if on_floor is not None and math.isfinite(floor_mean) and floor_mean > 0
                        else None,
                        by_construction=construct,
                        identical_to_tokens=f.identical if variant not in ("-", "tokens") else None,
                        train_s=f.train_s,
                    )
                )
                baseline = model_name(learner, "tokens") if variant != "-" else PRODUCT
                if name == baseline or (question, phase, baseline) not in fits:
                    continue
                imp = _improvement(f, fits[(question, phase, baseline)], spec)
                d = decide(imp, construct and f.identical, prompts_per_point)
                paired.append(
                    PairedResult(
                        question=question,
                        phase=phase,
                        model=name,
                        baseline=baseline,
                        improvement_pct=_iv(imp),
                        decision=d.decision,
                        prompts_per_point_needed=d.prompts_per_point_needed,
                        by_construction=construct,
                        note=(BY_CONSTRUCTION_NOTE if construct else d.note),
                    )
                )
    lines = _lines(cell_out, paired, floor_out)
    return RepeatedResult(
        k=spec.k,
        seeds=spec.seeds,
        max_decode_rows=spec.max_decode_rows,
        questions={q: f"{QUESTION_TEXT[q]} ({len(v)} folds: {v[0].label}{' …' if len(v) > 1 else ''})"
                   for q, v in folds.items()},
        folds={q: len(v) for q, v in folds.items()},
        prompts_per_point=prompts_per_point,
        rule=(
            f"relative MAPE reduction vs tokens (same learner), 95% interval: worth it when its lower end > "
            f"{WORTH_IT_PCT:.0f}%, not worth it when its upper end < {NOT_WORTH_PCT:.0f}%, otherwise undecided"
        ),
        cells=cell_out,
        paired=paired,
        noise_floor=floor_out,
        lines=lines,
    )


def fmt_iv(iv: IntervalResult, digits: int = 1) -> str:
    """`mean [low, high]`, with `–` for missing ends."""
    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.{digits}f}"

    if iv.low is None or iv.high is None:
        return f(iv.mean)
    return f"{f(iv.mean)} [{f(iv.low)}, {f(iv.high)}]"


def _lines(
    cells: Sequence[CellResult], paired: Sequence[PairedResult], floors: Sequence[HeldOutFloorResult]
) -> list[str]:
    out = []
    for fl in floors:
        out.append(
            f"{fl.phase}, {fl.question}: noise floor on the held-out rows {fmt_iv(fl.corrected_mape_pct, 2)}% "
            f"(raw leave-one-out {fmt_iv(fl.raw_mape_pct, 2)}%, × sqrt((n−1)/n) for n = {fl.repeats} repeats)"
        )
    groups: dict[tuple[str, str, str], list[PairedResult]] = {}
    for p in paired:
        if not p.by_construction:
            groups.setdefault((p.question, p.phase, p.baseline), []).append(p)
    for (question, phase, baseline), items in groups.items():
        parts = []
        for decision in ("worth it", "undecided", "not worth it", "no data"):
            chosen = [p for p in items if p.decision == decision]
            if not chosen:
                continue
            parts.append(
                f"{decision}: "
                + ", ".join(
                    f"{p.model.split(':')[-1]} {fmt_iv(p.improvement_pct)}%"
                    + (f" (~{p.prompts_per_point_needed:.0f} prompts/point)" if p.prompts_per_point_needed else "")
                    for p in chosen
                )
            )
        out.append(f"{phase}, {question}, MAPE reduction vs {baseline}: " + "; ".join(parts))
    construct = sorted({p.model for p in paired if p.by_construction})
    if construct:
        same = all(c.identical_to_tokens for c in cells if c.model in construct)
        out.append(
            f"{', '.join(construct)}: {BY_CONSTRUCTION_NOTE}"
            + ("; every fold's predictions were identical to tokens'." if same else
               "; (some fold differed: LightGBM binning, see identical_to_tokens).")
        )
    by_q = {(c.question, c.phase, c.model): c for c in cells}
    for phase in PHASES:
        inside = by_q.get(("by_prompt", phase, PRODUCT))
        for model in ("physics_trees", "physics", "lightgbm:residual", "closed_form", PRODUCT):
            longer = by_q.get(("longer", phase, model))
            ref = by_q.get(("by_prompt", phase, model))
            if longer is None or ref is None or inside is None or longer.mape_pct.mean is None:
                continue
            base = inside.mape_pct.mean or float("nan")
            out.append(
                f"{phase}, longer prompts: {model} MAPE {fmt_iv(longer.mape_pct)}% = "
                f"{longer.mape_pct.mean / base:.1f}× the product's in-range MAPE ({base:.1f}%; target <= 2×)"
            )
    return out


def print_repeated(res: RepeatedResult, console: Console) -> None:
    """One table per held-out question (MAPE, R², MAE, p90 with 95% intervals; × floor on the same rows), the
    noise floor, and the verdict lines."""
    paired = {(p.question, p.phase, p.model): p for p in res.paired}
    for question, desc in res.questions.items():
        table = Table(title=f"Experiment 2, held out {question}: {desc}")
        for c in ("phase", "model", "MAPE % [95% CI]", "R²", "MAE ms", "p90 APE %", "× floor", "vs tokens %",
                  "decision"):
            table.add_column(c, justify="left" if c in ("phase", "model", "decision") else "right")
        for cell in (c for c in res.cells if c.question == question):
            p = paired.get((question, cell.phase, cell.model))
            decision = p.decision + (" (by construction)" if p.by_construction else "") if p else ""
            table.add_row(
                cell.phase,
                cell.model,
                fmt_iv(cell.mape_pct, 2),
                fmt_iv(cell.r2, 3),
                fmt_iv(cell.mae_ms, 3),
                fmt_iv(cell.p90_ape_pct, 1),
                "–" if cell.mape_vs_noise_floor is None else f"{cell.mape_vs_noise_floor:.2f}",
                fmt_iv(p.improvement_pct) if p else "",
                decision,
            )
        console.print(table)
    console.print(f"[bold]Rule[/bold]: {res.rule}")
    for line in res.lines:
        console.print(f"- {line}")
