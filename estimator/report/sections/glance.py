"""At a glance: the runs, their size, and the headline of every other section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from estimator.data.runs import PHASES, RunSet
from estimator.report.document import SECTIONS, Bullets, Note, Section
from estimator.report.plots import fmt
from estimator.report.sections.manifest import manifest_rows
from estimator.study.analyze import CV_INSUFFICIENT_PCT, CV_SUFFICIENT_PCT
from estimator.study.nightly_results import NightlySummary


def glance_section(
    runset: RunSet,
    exp1: Mapping[str, Any],
    acc: Mapping[str, Any],
    variants: Mapping[str, Any],
    nightly: NightlySummary | None,
    missing: Sequence[str],
) -> Section:
    sec = Section("glance", SECTIONS["glance"])
    items = []
    for r in runset.runs:
        rows = dict(manifest_rows(r))
        items.append(f"Run `{r.run_id}`: {rows.get('status', '?')} on {rows.get('device', '?')}.")
    samples = runset.samples
    items.append(
        f"{len(samples)} timed steps ({int((samples['phase'] == 'prefill').sum())} prefill, "
        f"{int((samples['phase'] == 'decode').sum())} decode), {samples['prompt_id'].nunique()} prompts, "
        f"text_tokens {int(samples['text_tokens'].min())}–{int(samples['text_tokens'].max())}, "
        f"configs over {', '.join(runset.config_columns)}."
    )
    for p in PHASES:
        if p in exp1:
            e = exp1[p]
            items.append(
                f"Experiment 1, {p}: median CV across different prompts {fmt(e.get('median_cv_distinct_pct'), 1)}% "
                f"vs {fmt(e.get('median_cv_same_pct'), 1)}% for repeats of one prompt (noise floor) → "
                f"**{e.get('verdict')}** (bars: {CV_SUFFICIENT_PCT:.0f}% / {CV_INSUFFICIENT_PCT:.0f}%)."
            )
    if "held_out_mape_pct" in acc:
        figs = ", ".join(f"{p} {fmt(v)}%" for p, v in acc["held_out_mape_pct"].items())
        items.append(f"Model ({acc.get('variant')}): held-out MAPE by prompt {figs} (from its meta.json).")
    items.extend(str(line) for line in variants.get("embedding_answer") or [])
    if nightly:
        items.append(
            f"Nightly: {'REGRESSION FLAGGED' if nightly.regression else 'no regression'} against baseline "
            f"`{nightly.baseline_run_id}`."
        )
    sec.add(Bullets(items))
    if missing:
        sec.add(Note("Missing from this report: " + "; ".join(missing)))
    return sec
