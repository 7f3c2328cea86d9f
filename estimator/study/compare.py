"""Experiment 2: the feature variants and reference models on the same held-out splits, and the verdict."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field, field_validator
from rich.console import Console
from rich.table import Table

from estimator.data.runs import PHASES, RunsSpec, json_number, load_runs
from estimator.errors import EstimatorError
from estimator.model.closed_form import ClosedForm, model_group
from estimator.model.embedding import EmbeddingCache, embed_texts
from estimator.model.evaluation import (
    Split,
    error_metrics,
    length_cutoff,
    split_by_length,
    split_by_prompt,
)
from estimator.model.features import (
    VARIANTS,
    FeatureSpec,
    Phase,
    Variant,
    as_columns,
    axis_categories,
    feature_axes,
)
from estimator.model.train import (
    DEFAULT_MAX_DECODE_ROWS,
    EmbeddingContext,
    fit_phase_model,
    predict_frame,
    subsample,
)
from estimator.study.analyze import LooFloor, noise_floor
from estimator.study.learners import LEARNERS, Learner
from estimator.study.references import fit_random_forest, median_call_us
from estimator.study.repeated import RepeatedSpec, evaluate_repeated, print_repeated
from estimator.study.results import ComparisonResult, RepeatedResult
from estimator.study.verdict import build_verdict, error_analysis

REFERENCES: tuple[str, ...] = ("closed_form", "random_forest")


class CompareSpec(RunsSpec):
    """What `estimate compare` does: runs, output folder (default `<first run>/compare`), variants, sizes."""

    out: Path | None = None
    variants: list[Variant] = Field(default_factory=lambda: list(VARIANTS), min_length=1)  # type: ignore[arg-type]
    references: bool = True
    seed: int = 0
    test_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    max_decode_rows: int = Field(default=DEFAULT_MAX_DECODE_ROWS, ge=100)
    cost_calls: int = Field(default=200, ge=5)
    embedding_cost_calls: int = Field(default=10, ge=1)
    repeated: bool = True
    folds: int = Field(default=5, ge=2, le=20)
    seeds: int = Field(default=3, ge=1, le=20)
    learners: list[Learner] = Field(default_factory=lambda: list(LEARNERS), min_length=1)  # type: ignore[arg-type]
    repeated_decode_rows: int = Field(default=2000, ge=100)

    @field_validator("variants")
    @classmethod
    def _tokens_first(cls, variants: list[Variant]) -> list[Variant]:
        uniq: list[Variant] = list(dict.fromkeys(variants))
        if "tokens" not in uniq:
            uniq.insert(0, "tokens")  # every improvement is measured against it
        return uniq

    def out_dir(self) -> Path:
        return self.out if self.out is not None else self.runs[0] / "compare"


@dataclass
class Comparison:
    """Scores per split × phase × model, the verdict, the error analysis and the per-row test predictions."""

    scores: pd.DataFrame
    verdict: dict[str, Any]
    error_analysis: dict[str, Any]
    noise_floor: dict[str, LooFloor]
    scale: dict[str, dict[str, float]]
    predictions: pd.DataFrame
    splits: dict[str, str]
    runs: list[str]
    timings_s: dict[str, float] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)
    repeated: RepeatedResult | None = None

    def result(self) -> ComparisonResult:
        """The typed result that compare.json serialises (what the report reads back)."""
        payload = {
            "experiment": "2: feature variants",
            "runs": self.runs,
            "splits": self.splits,
            "latency_scale_ms": self.scale,
            "noise_floor": {p: f.as_dict() for p, f in self.noise_floor.items()},
            "scores": self.scores.to_dict("records"),
            "verdict": self.verdict,
            "error_analysis": self.error_analysis,
            "timings_s": self.timings_s,
            "repeated": self.repeated.model_dump(mode="json") if self.repeated else None,
        }
        return ComparisonResult.model_validate(_clean(payload))




def _clean(obj: Any) -> Any:
    """JSON-ready copy: NaN → None, numpy scalars → Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return json_number(obj)


def latency_scale(frames: Mapping[Phase, pd.DataFrame]) -> dict[str, dict[str, float]]:
    """p10 / median / p90 / max latency (ms) per phase."""
    out: dict[str, dict[str, float]] = {}
    for p, f in frames.items():
        y = f["latency_ms"].to_numpy()
        out[p] = {
            "p10_ms": float(np.percentile(y, 10)),
            "median_ms": float(np.median(y)),
            "p90_ms": float(np.percentile(y, 90)),
            "max_ms": float(y.max()),
        }
    return out


def _representative_row(frame: pd.DataFrame, columns: Sequence[str]) -> dict[str, Any]:
    """The test row whose text_tokens is nearest the median, as a plain dict of raw inputs."""
    idx = int((frame["text_tokens"] - frame["text_tokens"].median()).abs().to_numpy().argmin())
    row = frame.iloc[idx]
    return {
        c: (row[c].item() if isinstance(row[c], np.generic) else row[c])
        for c in columns
        if c in frame.columns
    }


def _length_splits(frames: Mapping[Phase, pd.DataFrame], test_fraction: float) -> dict[Phase, Split]:
    cut = length_cutoff(frames["prefill"]["text_tokens"].to_numpy(), test_fraction)
    return {p: split_by_length(frames[p], cutoff=cut) for p in frames}


def run_compare(spec: CompareSpec, progress: Callable[[str], None] | None = None) -> Comparison:
    """Experiment 2 on the runs of `spec` (nothing written; see `compare`)."""
    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    runset = load_runs(spec.runs)
    axes = feature_axes(runset.axes)
    categories = axis_categories(runset.samples, axes)
    need_text = "embedding" in spec.variants
    frames: dict[Phase, pd.DataFrame] = {}
    for p in PHASES:
        f = runset.phase(p)
        if f.empty:
            raise EstimatorError(f"no {p} samples in the given runs")
        frames[p] = runset.with_text(f) if need_text else f
    floors = noise_floor(runset.samples, runset.config_columns)
    cache = EmbeddingCache(spec.out_dir() / "embedding_cache.parquet") if need_text else None
    split_sets: dict[str, dict[Phase, Split]] = {
        "by_prompt": {p: split_by_prompt(frames[p], spec.test_fraction, spec.seed) for p in frames},
        "by_length": _length_splits(frames, spec.test_fraction),
    }
    scores: list[dict[str, Any]] = []
    preds: list[pd.DataFrame] = []
    timings: dict[str, float] = {}
    keep_cols = [
        c
        for c in (
            "run_id",
            "point_id",
            "prompt_id",
            "prompt_kind",
            *runset.config_columns,
            "text_tokens",
            "position",
        )
        if c in frames["prefill"].columns
    ]
    keep_cols += [c for c in ("step_index", "latency_ms") if c not in keep_cols]
    tel_cols = [c for c in frames["prefill"].columns if c.startswith("tel_") or c == "throttled"]
    for split_name, splits in split_sets.items():
        say(f"split {split_name}: {splits['prefill'].description}")
        train = {p: frames[p].iloc[splits[p].train].reset_index(drop=True) for p in frames}
        train["decode"] = subsample(train["decode"], spec.max_decode_rows, spec.seed)
        test = {p: frames[p].iloc[splits[p].test].reset_index(drop=True) for p in frames}
        t0 = time.perf_counter()
        closed = {p: ClosedForm(p, axes, runset.config_columns).fit(train[p]) for p in frames}
        cf_train_s = time.perf_counter() - t0
        group = model_group(axes)  # the product's residual variant: the physics form (closed_form.py)
        physics = {p: ClosedForm(p, axes, runset.config_columns, group_column=group).fit(train[p]) for p in frames}
        ctx = None
        if need_text:
            say("  embedding training prompts")
            t0 = time.perf_counter()
            ctx = EmbeddingContext.fit(list(train.values()), cache or EmbeddingCache())
            timings[f"{split_name}_embedding_fit_s"] = time.perf_counter() - t0
        measure_cost = split_name == "by_prompt"
        for phase in PHASES:
            tr, te = train[phase], test[phase]
            y = te["latency_ms"].to_numpy()
            row = _representative_row(te, [*axes, "text_tokens", "position", "text"])
            row_cols, _ = as_columns(row)
            results: dict[str, tuple[np.ndarray, float, float | None]] = {}
            for variant in spec.variants:
                say(f"  {phase}: {variant}")
                t0 = time.perf_counter()
                model = fit_phase_model(tr, phase, variant, axes, categories, spec.seed, physics[phase], ctx)
                fit_s = time.perf_counter() - t0 + (cf_train_s / 2 if variant == "residual" else 0.0)
                yhat = predict_frame(model, te, ctx)
                cost = None
                if measure_cost:
                    cost = _variant_cost_us(model, row, row_cols, ctx, spec)
                results[variant] = (yhat, fit_s, cost)
            if spec.references:
                say(f"  {phase}: references")
                cf = closed[phase]
                te_cols, n = as_columns(te)
                cost = None
                if measure_cost:
                    cost = median_call_us(partial(cf.predict, row_cols, 1), spec.cost_calls)
                results["closed_form"] = (cf.predict(te_cols, n), cf_train_s / 2, cost)
                tok = FeatureSpec(phase, "tokens", tuple(axes), categories)
                tr_cols, tr_n = as_columns(tr)
                t0 = time.perf_counter()
                forest = fit_random_forest(tok.matrix(tr_cols, tr_n), tr["latency_ms"].to_numpy(), spec.seed)
                fit_s = time.perf_counter() - t0
                yhat = forest.predict(tok.matrix(te_cols, n))
                cost = None
                if measure_cost:
                    forest.set_params(n_jobs=1)  # a single row: thread dispatch would dominate
                    x_one = partial(tok.matrix, row_cols, 1)
                    cost = median_call_us(_compose(forest.predict, x_one), max(5, spec.cost_calls // 4))
                results["random_forest"] = (yhat, fit_s, cost)
            for name, (yhat, fit_s, cost) in results.items():
                m = error_metrics(y, yhat)
                kind = "reference" if name in REFERENCES else "variant"
                scores.append(
                    {
                        "split": split_name,
                        "phase": phase,
                        "model": name,
                        "kind": kind,
                        **{k: v for k, v in m.items() if k != "n"},
                        "mape_vs_noise_floor": m["mape_pct"] / floors[phase].corrected_mape_pct
                        if math.isfinite(floors[phase].corrected_mape_pct) and floors[phase].corrected_mape_pct > 0
                        else float("nan"),
                        "cost_us": cost if cost is not None else float("nan"),
                        "train_s": fit_s,
                        "n_train": len(tr),
                        "n_test": len(te),
                    }
                )
                p = te[
                    [c for c in keep_cols if c in te.columns] + [c for c in tel_cols if c in te.columns]
                ].copy()
                p.insert(0, "predictor", name)
                p.insert(0, "phase", phase)
                p.insert(0, "split", split_name)
                p["predicted_ms"] = yhat
                p["ape_pct"] = np.abs(yhat - y) / y * 100.0
                preds.append(p)
    score_frame = pd.DataFrame(scores)
    predictions = pd.concat(preds, ignore_index=True)
    scale = latency_scale(frames)
    repeated = None
    if spec.repeated:
        say(f"repeated folds: {spec.folds} folds × {spec.seeds} seeds by prompt, each inner length, longer prompts")
        rspec = RepeatedSpec(
            k=spec.folds,
            seeds=spec.seeds,
            variants=tuple(spec.variants),
            learners=tuple(spec.learners),
            references=spec.references,
            max_decode_rows=spec.repeated_decode_rows,
            test_fraction=spec.test_fraction,
        )
        repeated = evaluate_repeated(frames, axes, categories, runset.config_columns, rspec, cache, say)
        timings.update(repeated.timings_s)
    verdict = build_verdict(score_frame, floors, scale, repeated)
    analysis = error_analysis(predictions, runset, floors)
    timings["total_s"] = time.perf_counter() - t_start
    return Comparison(
        scores=score_frame,
        verdict=verdict,
        error_analysis=analysis,
        noise_floor=floors,
        scale=scale,
        predictions=predictions,
        splits={k: v["prefill"].description for k, v in split_sets.items()},
        runs=[r.run_id for r in runset.runs],
        timings_s=timings,
        repeated=repeated,
    )


def _variant_cost_us(
    model: Any,
    row: Mapping[str, Any],
    row_cols: Mapping[str, np.ndarray],
    ctx: EmbeddingContext | None,
    spec: CompareSpec,
) -> float:
    """Median µs of one single-row prediction from raw inputs, feature computation included.

    For the embedding variant this includes embedding the prompt text and projecting it.
    """
    if model.spec.variant == "embedding":
        if ctx is None:
            raise EstimatorError("embedding variant without its projection")
        text = [str(row["text"])]
        proj = ctx.projection
        return median_call_us(
            lambda: model.predict(row_cols, 1, proj.transform(embed_texts(text))),
            spec.embedding_cost_calls,
            1,
        )
    return median_call_us(lambda: model.predict(row_cols, 1), spec.cost_calls)


def write_comparison(comp: Comparison, out: Path) -> list[Path]:
    """Write compare.json, compare.csv and predictions.parquet into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, pq_path = out / "compare.csv", out / "compare.json", out / "predictions.parquet"
    comp.scores.to_csv(csv_path, index=False, float_format="%.6g")
    result = comp.result()
    json_path.write_text(json.dumps(result.model_dump(mode="json"), indent=1) + "\n")
    comp.predictions.to_parquet(pq_path, index=False)
    comp.written = [json_path, csv_path, pq_path]
    return comp.written


def compare(spec: CompareSpec, progress: Callable[[str], None] | None = None) -> Comparison:
    """Run Experiment 2 and write its outputs into `spec.out_dir()`."""
    comp = run_compare(spec, progress)
    write_comparison(comp, spec.out_dir())
    return comp


_NOT_CONFIG = ("mape_pct", "mean_ms", "n", "noise_floor_mape_pct")


def _compose(outer: Callable[[Any], Any], inner: Callable[[], Any]) -> Callable[[], Any]:
    """`lambda: outer(inner())` without capturing loop variables."""
    return lambda: outer(inner())


def _f(v: Any, digits: int = 2) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{x:.{digits}f}" if math.isfinite(x) else "–"


def print_comparison(comp: Comparison, console: Console) -> None:
    """Rich tables of the scores, the verdict and the error analysis."""
    for split, desc in comp.splits.items():
        table = Table(title=f"Experiment 2, one split (no interval), held out {split}: {desc}")
        for c in ("phase", "model", "R²", "MAE ms", "MAPE %", "× noise", "p90 APE %", "cost µs", "train s"):
            table.add_column(c, justify="right" if c not in ("phase", "model") else "left")
        sub = comp.scores[comp.scores["split"] == split]
        for _, r in sub.iterrows():
            table.add_row(
                r["phase"],
                r["model"],
                _f(r["r2"], 3),
                _f(r["mae_ms"], 3),
                _f(r["mape_pct"]),
                _f(r["mape_vs_noise_floor"]),
                _f(r["p90_ape_pct"]),
                _f(r["cost_us"], 0),
                _f(r["train_s"], 2),
            )
        console.print(table)
    floors = ", ".join(
        f"{p} {f.corrected_mape_pct:.2f}% (raw {f.mape_pct:.2f}%, {f.groups} groups)"
        for p, f in comp.noise_floor.items()
    )
    console.print(f"noise-floor MAPE (same prompt, leave-one-out × sqrt((n−1)/n), all rows): {floors}")
    if comp.repeated is not None:
        print_repeated(comp.repeated, console)
    console.print("[bold]Verdict[/bold]")
    for line in comp.verdict["lines"]:
        console.print(f"- {line}")
    console.print("[bold]Where the remaining error comes from[/bold] (tokens, by-prompt split)")
    for phase in PHASES:
        ea = comp.error_analysis.get(phase)
        if not ea:
            continue
        worst = ea["per_config"][:3]
        cfg_txt = "; ".join(
            f"{ {k: v for k, v in c.items() if k not in _NOT_CONFIG} } "
            f"MAPE {c['mape_pct']:.2f}% (floor {_f(c['noise_floor_mape_pct'])}%)"
            for c in worst
        )
        console.print(f"- {phase}: worst configs: {cfg_txt}")
        tok = ea["by_text_tokens"]
        key = "text_tokens" if tok and "text_tokens" in tok[0] else "text_tokens_bin"
        console.print(
            f"- {phase}: MAPE by text_tokens: " + ", ".join(f"{t[key]}: {t['mape_pct']:.1f}%" for t in tok)
        )
        tel = ea["telemetry_correlation"][:3]
        if tel:
            console.print(
                f"- {phase}: residual vs telemetry (Spearman): "
                + ", ".join(f"{t['column']} {t['spearman_rho']:+.2f}" for t in tel)
            )
        if ea["per_run_median_residual"]:
            console.print(
                f"- {phase}: run offsets (median residual %): "
                + ", ".join(
                    f"{r['run_id']} {r['median_residual_pct']:+.1f}" for r in ea["per_run_median_residual"]
                )
            )
    if comp.written:
        console.print("wrote " + ", ".join(str(p) for p in comp.written))
