"""Experiment 1: is the token count enough? CV across different prompts vs the same-prompt noise floor."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from estimator.data.runs import RunSet, RunsSpec, json_number, load_runs
from estimator.errors import EstimatorError

CV_SUFFICIENT_PCT = 10.0
CV_INSUFFICIENT_PCT = 15.0


class AnalyzeSpec(RunsSpec):
    """What `estimate analyze` does: which runs, where the table goes (default `<first run>/analysis`)."""

    out: Path | None = None

    def out_dir(self) -> Path:
        return self.out if self.out is not None else self.runs[0] / "analysis"


@dataclass(frozen=True)
class LooFloor:
    """MAPE (%) of predicting each row by the mean of the other rows in its group (leave-one-out), raw and
    corrected for the small-n leave-one-out inflation (`corrected_mape_pct`, docs/noise-floor.md)."""

    mape_pct: float
    rows: int
    groups: int
    corrected_mape_pct: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "mape_pct": json_number(self.mape_pct),
            "corrected_mape_pct": json_number(self.corrected_mape_pct),
            "rows": self.rows,
            "groups": self.groups,
        }


@dataclass
class Analysis:
    """Experiment 1's table (one row per run × config × text_tokens) and its per-phase summary."""

    table: pd.DataFrame
    summary: dict[str, dict[str, Any]]
    config_columns: list[str]
    runs: list[str]
    written: list[Path] = field(default_factory=list)




def loo_correction(n: np.ndarray | int) -> np.ndarray:
    """sqrt((n−1)/n): the leave-one-out deviation y_i − mean(others) has variance σ²·n/(n−1) (the mean of the
    n−1 others carries σ²/(n−1) of its own), so this factor turns it back into the error of the true mean."""
    n_arr = np.asarray(n, dtype=np.float64)
    return np.sqrt((n_arr - 1.0) / n_arr)


def loo_ape_pct(frame: pd.DataFrame, group_columns: Sequence[str], corrected: bool = False) -> np.ndarray:
    """APE (%) of each row against the mean of the OTHER rows of its group; groups of one row are skipped.

    `corrected` scales each row's APE by sqrt((n−1)/n) (n = its group's size): the noise floor a predictor that
    knew the true mean would score (docs/noise-floor.md).
    """
    if frame.empty:
        return np.zeros(0)
    grouped = frame.groupby(list(group_columns), sort=False, dropna=False)["latency_ms"]
    total = grouped.transform("sum").to_numpy()
    count = grouped.transform("count").to_numpy()
    y = frame["latency_ms"].to_numpy(dtype=np.float64)
    ok = count >= 2
    pred = (total[ok] - y[ok]) / (count[ok] - 1)
    out = np.abs(pred - y[ok]) / y[ok] * 100.0
    return out * loo_correction(count[ok]) if corrected else out


def loo_mask(frame: pd.DataFrame, group_columns: Sequence[str]) -> np.ndarray:
    """Rows that `loo_ape_pct` scores (their group has at least two rows), as a boolean mask."""
    if frame.empty:
        return np.zeros(0, dtype=bool)
    count = frame.groupby(list(group_columns), sort=False, dropna=False)["latency_ms"].transform("count")
    return (count >= 2).to_numpy()


def _group_keys(config_columns: Sequence[str], phase: str, *, by_prompt: bool) -> list[str]:
    keys = ["run_id", *config_columns, "text_tokens"]
    if by_prompt:
        keys.append("prompt_id")
    if phase == "decode":
        keys.append("step_index")
    return keys


def _loo(frame: pd.DataFrame, keys: Sequence[str]) -> LooFloor:
    apes = loo_ape_pct(frame, keys)
    fixed = loo_ape_pct(frame, keys, corrected=True)
    groups = int((frame.groupby(list(keys), sort=False).size() >= 2).sum()) if len(frame) else 0
    return LooFloor(
        mape_pct=float(np.mean(apes)) if len(apes) else float("nan"),
        rows=len(apes),
        groups=groups,
        corrected_mape_pct=float(np.mean(fixed)) if len(fixed) else float("nan"),
    )


def noise_floor(samples: pd.DataFrame, config_columns: Sequence[str]) -> dict[str, LooFloor]:
    """Noise-floor MAPE per phase: same-prompt repeats, each predicted by the mean of the other repeats.

    Decode repeats are compared at equal position (same step_index).
    """
    same = samples[samples["prompt_kind"] == "same"]
    out = {}
    for phase in ("prefill", "decode"):
        rows = same[same["phase"] == phase]
        out[phase] = _loo(rows, _group_keys(config_columns, phase, by_prompt=True))
    return out


def token_only_floor(samples: pd.DataFrame, config_columns: Sequence[str]) -> dict[str, LooFloor]:
    """MAPE per phase of the best token-count-only lookup: each distinct prompt predicted by the mean of the
    other prompts with the same config and text_tokens (and step, for decode)."""
    distinct = samples[samples["prompt_kind"] == "distinct"]
    out = {}
    for phase in ("prefill", "decode"):
        rows = distinct[distinct["phase"] == phase]
        out[phase] = _loo(rows, _group_keys(config_columns, phase, by_prompt=False))
    return out


def _cv_stats(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    g = frame.groupby(list(keys), sort=True, dropna=False)["latency_ms"]
    stats = g.agg(["mean", "std", "count"]).reset_index()
    stats["cv_pct"] = np.where(stats["count"] >= 2, stats["std"] / stats["mean"] * 100.0, np.nan)
    return stats


def _phase_table(samples: pd.DataFrame, config_columns: Sequence[str], phase: str) -> pd.DataFrame:
    """Per (run, config, text_tokens): mean latency, CV across distinct prompts and across repeats of one.

    Decode CVs are taken at equal position (per step_index) and summarised by their median over steps.
    """
    base = ["run_id", *config_columns, "text_tokens"]
    rows = samples[samples["phase"] == phase]
    distinct = rows[rows["prompt_kind"] == "distinct"]
    same = rows[rows["prompt_kind"] == "same"]
    d = _cv_stats(distinct, _group_keys(config_columns, phase, by_prompt=False))
    s = _cv_stats(same, _group_keys(config_columns, phase, by_prompt=True))
    d_agg = d.groupby(base, sort=True, dropna=False).agg(
        mean_ms=("mean", "mean"), cv_distinct_pct=("cv_pct", "median"), n_distinct=("count", "max")
    )
    s_agg = s.groupby(base, sort=True, dropna=False).agg(
        cv_same_pct=("cv_pct", "median"), n_same=("count", "max")
    )
    table = d_agg.join(s_agg, how="outer").reset_index()
    table["n_distinct"] = table["n_distinct"].fillna(0).astype("int64")
    table["n_same"] = table["n_same"].fillna(0).astype("int64")
    table["cv_excess_pct"] = table["cv_distinct_pct"] - table["cv_same_pct"]
    content = table["cv_distinct_pct"] ** 2 - table["cv_same_pct"] ** 2
    table["content_cv_pct"] = np.sqrt(content.clip(lower=0))
    renamed = {c: f"{phase}_{c}" for c in table.columns if c not in base}
    return table.rename(columns=renamed)


def reading(cv_pct: float) -> str:
    """The notes' reading of a CV across different prompts (percent)."""
    if not math.isfinite(cv_pct):
        return "no data"
    if cv_pct < CV_SUFFICIENT_PCT:
        return "token count suffices"
    if cv_pct > CV_INSUFFICIENT_PCT:
        return "more information needed"
    return "borderline"


def cv_table(samples: pd.DataFrame, config_columns: Sequence[str]) -> pd.DataFrame:
    """Experiment 1's table: one row per run × config × text_tokens, prefill and decode side by side."""
    base = ["run_id", *config_columns, "text_tokens"]
    pre = _phase_table(samples, config_columns, "prefill")
    dec = _phase_table(samples, config_columns, "decode")
    table = pre.merge(dec, on=base, how="outer").sort_values(base).reset_index(drop=True)
    for phase in ("prefill", "decode"):
        table[f"{phase}_reading"] = [reading(float(v)) for v in table[f"{phase}_cv_distinct_pct"]]
    return table


def _summarise(table: pd.DataFrame, phase: str, floor: LooFloor, token_only: LooFloor) -> dict[str, Any]:
    cvd = table[f"{phase}_cv_distinct_pct"].dropna()
    cvs = table[f"{phase}_cv_same_pct"].dropna()
    exc = table[f"{phase}_cv_excess_pct"].dropna()
    med_d = float(cvd.median()) if len(cvd) else float("nan")
    med_s = float(cvs.median()) if len(cvs) else float("nan")
    med_e = float(exc.median()) if len(exc) else float("nan")
    content = table[f"{phase}_content_cv_pct"].dropna()
    med_c = float(content.median()) if len(content) else float("nan")
    verdict = reading(med_d)
    head = f"median CV across different prompts {med_d:.1f}%"
    if verdict == "token count suffices":
        text = f"{head} < {CV_SUFFICIENT_PCT:.0f}%: token count suffices"
    elif verdict == "more information needed":
        text = f"{head} > {CV_INSUFFICIENT_PCT:.0f}%: more information needed"
    elif verdict == "borderline":
        text = (
            f"median CV across different prompts {med_d:.1f}% is between {CV_SUFFICIENT_PCT:.0f}% and "
            f"{CV_INSUFFICIENT_PCT:.0f}%: inconclusive"
        )
    else:
        text = "no groups with two or more different prompts"
    if math.isfinite(med_s):
        text += (
            f"; same-prompt noise floor CV {med_s:.1f}%, so prompt content's own share of the CV is "
            f"√(d² − s²) ≈ {med_c:.1f}% (median over groups; it is at least d − s = {max(med_e, 0.0):.1f} points)"
        )
        if verdict != "token count suffices" and med_s >= CV_SUFFICIENT_PCT and med_c < CV_SUFFICIENT_PCT / 2:
            text += (
                " — the spread is mostly measurement noise (repeats of one prompt vary as much), so what is "
                "missing is a quieter measurement, not prompt content"
            )
    if math.isfinite(floor.mape_pct) and math.isfinite(token_only.mape_pct):
        text += (
            f"; a token-count-only lookup scores MAPE {token_only.mape_pct:.2f}% vs noise-floor MAPE "
            f"{floor.mape_pct:.2f}% (ratio {token_only.mape_pct / floor.mape_pct:.2f})"
        )
    return {
        "groups": len(cvd),
        "median_cv_distinct_pct": json_number(med_d),
        "median_cv_same_pct": json_number(med_s),
        "median_cv_excess_pct": json_number(med_e),
        "median_content_cv_pct": json_number(med_c),
        "share_groups_cv_below_10_pct": json_number(
            float((cvd < CV_SUFFICIENT_PCT).mean()) if len(cvd) else float("nan")
        ),
        "share_groups_cv_above_15_pct": json_number(
            float((cvd > CV_INSUFFICIENT_PCT).mean()) if len(cvd) else float("nan")
        ),
        "noise_floor": floor.as_dict(),
        "token_only_loo": token_only.as_dict(),
        "verdict": verdict,
        "reading": text,
    }


def analyze_runs(runset: RunSet) -> Analysis:
    """Experiment 1 on loaded runs (nothing written)."""
    samples = runset.samples
    if not (samples["prompt_kind"] == "distinct").any():
        raise EstimatorError("no rows with prompt_kind == 'distinct': nothing to compare across prompts")
    table = cv_table(samples, runset.config_columns)
    floors = noise_floor(samples, runset.config_columns)
    token_only = token_only_floor(samples, runset.config_columns)
    summary = {p: _summarise(table, p, floors[p], token_only[p]) for p in ("prefill", "decode")}
    return Analysis(
        table=table,
        summary=summary,
        config_columns=list(runset.config_columns),
        runs=[r.run_id for r in runset.runs],
    )


def write_analysis(analysis: Analysis, out: Path) -> list[Path]:
    """Write `analysis.csv` (the table) and `analysis.json` (summary + table) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "analysis.csv", out / "analysis.json"
    analysis.table.to_csv(csv_path, index=False, float_format="%.6g")
    records = [{k: json_number(v) for k, v in r.items()} for r in analysis.table.to_dict("records")]
    payload = {
        "experiment": "1: is the token count enough?",
        "runs": analysis.runs,
        "config_columns": analysis.config_columns,
        "thresholds_pct": {"sufficient_below": CV_SUFFICIENT_PCT, "insufficient_above": CV_INSUFFICIENT_PCT},
        "summary": analysis.summary,
        "rows": records,
    }
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    analysis.written = [csv_path, json_path]
    return analysis.written


def analyze(spec: AnalyzeSpec) -> Analysis:
    """Load the runs, run Experiment 1, write the table as CSV and JSON."""
    analysis = analyze_runs(load_runs(spec.runs))
    write_analysis(analysis, spec.out_dir())
    return analysis


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


_SHORT_READING = {
    "token count suffices": "tokens ok (<10%)",
    "more information needed": "need more (>15%)",
    "borderline": "borderline",
}


def print_analysis(analysis: Analysis, console: Console, max_rows: int = 80) -> None:
    """Rich table of Experiment 1 and the reading against the 10% / 15% thresholds."""
    table = Table(
        title="Experiment 1: latency spread at equal token count (CV, %; content = √(CV diff² − CV same²))",
        show_lines=False,
    )
    multi_run = len(analysis.runs) > 1
    cols = (["run_id"] if multi_run else []) + analysis.config_columns + ["text_tokens"]
    for c in cols:
        table.add_column(c, justify="right")
    for c in (
        "n",
        "prefill ms",
        "CV diff",
        "CV same",
        "content",
        "decode ms",
        "CV diff",
        "CV same",
        "content",
        "prefill reading",
    ):
        table.add_column(c, justify="right")
    frame = analysis.table
    for _, r in frame.head(max_rows).iterrows():
        table.add_row(
            *[str(r[c]) for c in cols],
            str(r["prefill_n_distinct"]),
            _fmt(r["prefill_mean_ms"], 2),
            _fmt(r["prefill_cv_distinct_pct"]),
            _fmt(r["prefill_cv_same_pct"]),
            _fmt(r["prefill_content_cv_pct"]),
            _fmt(r["decode_mean_ms"], 2),
            _fmt(r["decode_cv_distinct_pct"]),
            _fmt(r["decode_cv_same_pct"]),
            _fmt(r["decode_content_cv_pct"]),
            _SHORT_READING.get(str(r["prefill_reading"]), str(r["prefill_reading"])),
        )
    console.print(table)
    if len(frame) > max_rows:
        console.print(f"({len(frame) - max_rows} more rows in the CSV)")
    for phase in ("prefill", "decode"):
        s = analysis.summary[phase]
        console.print(f"[bold]{phase}[/bold]: {s['reading']}")
    if analysis.written:
        console.print("wrote " + ", ".join(str(p) for p in analysis.written))
