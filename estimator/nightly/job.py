"""The nightly job: sweep a committed spec, train, compare against the accepted baseline run, flag regressions.

One night (`run_nightly`):
1. run `profile sweep --spec SPEC --out STATE/runs --name nightly-<UTC time>` as a subprocess (the estimator never
   imports the harness or vLLM); or take an existing run folder (`run=`);
2. train the estimator on it (`STATE/models/<run_id>`, LightGBM text models + meta.json with held-out metrics);
3. compare it with the baseline (`STATE/baseline.json`, the last accepted night, or `baseline=RUN`):
   - latency, per config (the manifest's spec axes except text_tokens: tier, top_k, blocks, ...) and phase: the
     ratio tonight / baseline of the median latency per request (prefill: the request's prefill step; decode: the
     median of its decode steps), taken per text_tokens value and combined as a geometric mean over the values
     both runs have. A 95% bootstrap CI (requests resampled within each text_tokens value, each run on its own)
     gives the runs' own repeat spread; the config and phase are flagged when the whole CI lies above
     1 + tolerance (5%) and a second sweep, made only when something is flagged, repeats the flag (each config is
     measured for a few seconds, so a burst of other work on the machine can shift its whole window);
   - the estimator: held-out (by prompt) MAPE per phase from tonight's meta.json against the baseline's; flagged
     when it grew by more than 25% relative and by more than 1 percentage point;
4. write the summary JSON (`STATE/summaries/<run_id>.json`, copied to `STATE/latest.json`), append one line to
   `STATE/history.jsonl`, promote tonight to baseline when asked (`accept`) or when there was none (first night),
   and write the report with the trend over nights (`STATE/reports/<run_id>/report.html`).

Exit codes (`NightlyResult.exit_code`): 0 no regression, 1 regression flagged, 3 the sweep failed or left failed
points (the CLI adds 2 for bad input and 4 for a crash of the job itself).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from estimator.data.runs import RunSet, load_runs
from estimator.errors import EstimatorError
from estimator.nightly.control import (
    DEFAULT_MAPE_SPREAD,
    apply_history,
    apply_mape_history,
    control_limits,
    read_history_lines,
)
from estimator.nightly.interleave import (
    InterleavedNight,
    PairedVerdict,
    baseline_settings,
    refuse_injected,
    run_interleaved,
)
from estimator.nightly.spec import (
    BASELINE_FILE,
    EXIT_OK,
    EXIT_REGRESSION,
    EXIT_SWEEP_FAILED,
    HISTORY_FILE,
    LATEST_FILE,
    SUMMARY_SCHEMA,
    NightlySpec,
)
from estimator.nightly.state import Baseline, append_history, read_baseline, write_json_atomic
from estimator.nightly.stats import (
    apply_confirmation,
    compare_latency,
    compare_mape,
    condition_warnings,
    config_medians,
    held_out_mape,
    run_conditions,
)
from estimator.nightly.sweep import run_sweep
from estimator.study.nightly_results import ConfigComparison, HistoryLine, MapeComparison, NightlySummary

# ---------------------------------------------------------------- one night


@dataclass
class NightlyResult:
    summary: dict[str, Any]
    summary_path: Path
    history_path: Path
    report_path: Path | None
    exit_code: int
    messages: list[str] = field(default_factory=list)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _train(run_dir: Path, out: Path, spec: NightlySpec) -> dict[str, float | None]:
    from estimator.model.train import TrainSpec, train

    train(TrainSpec(runs=[run_dir], out=out, variant=spec.variant, seed=spec.seed))
    return held_out_mape(out)


def _spec_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    sa, sb = a.get("spec") or {}, b.get("spec") or {}
    keys = sorted(set(sa) | set(sb))
    return [k for k in keys if json.dumps(sa.get(k), sort_keys=True) != json.dumps(sb.get(k), sort_keys=True)]


def _model_warnings(checks: Sequence[ConfigComparison]) -> list[str]:
    seen: set[str] = set()
    out = []
    for c in checks:
        if c.models["baseline"] != c.models["tonight"] and c.label not in seen:
            seen.add(c.label)
            out.append(
                f"config {c.label} ran {'/'.join(c.models['tonight'])} tonight but "
                f"{'/'.join(c.models['baseline'])} in the baseline (same labels, different model)"
            )
    return out


def rerun_confirm(
    spec: NightlySpec,
    run_id: str,
    baseline: RunSet,
    axes: Sequence[str],
    checks: list[ConfigComparison],
    warnings: list[str],
    say: Callable[[str], None],
) -> str | None:
    """Sweep the spec once more (`<run_id>-confirm`) and keep only the flags it repeats; returns its run id."""
    flagged = ", ".join(f"{c.label} {c.phase}" for c in checks if c.flagged)
    say(f"confirm: {flagged} flagged; measuring once more")
    outcome = run_sweep(spec, f"{run_id}-confirm", say)
    if outcome.returncode != 0 or not (outcome.run_dir / "samples").is_dir():
        warnings.append(f"the confirmation sweep failed (exit {outcome.returncode}); the flags stand unconfirmed")
        return None
    rerun = load_runs([outcome.run_dir])
    again, _ = compare_latency(baseline, rerun, axes, spec.tolerance, spec.confidence, spec.bootstrap, spec.seed)
    apply_confirmation(checks, again)
    dropped = [f"{c.label} {c.phase}" for c in checks if c.confirm and not c.flagged]
    if dropped:
        warnings.append(
            f"flagged at first but not on the re-run ({rerun.runs[0].run_id}): {', '.join(dropped)}: a transient "
            "disturbance, not a regression"
        )
    return rerun.runs[0].run_id


def _interleave_settings(spec: NightlySpec, state: Path, warnings: list[str]) -> dict[str, Any] | None:
    """The accepted settings an interleaved night measures beside tonight's; None (with a warning when asked for)
    when there is nothing to interleave with."""
    if not spec.interleave:
        return None
    recorded = read_baseline(state)
    if spec.baseline is not None or recorded is None or recorded.settings is None:
        warnings.append(
            "--interleave: "
            + ("--baseline names a run folder, not settings" if spec.baseline is not None
               else "no accepted baseline yet" if recorded is None
               else "the accepted baseline recorded no settings (accepted from a finished run, or before the "
               "nightly kept them)")
            + "; one sweep tonight, judged by the single-sweep rule"
        )
        return None
    return recorded.settings


def _apply_interleaved(checks: Sequence[ConfigComparison], verdicts: Sequence[PairedVerdict]) -> None:
    """An interleaved night's flags are its paired rounds' (they hold the start-to-start spread the single-sweep
    rule needs the history's control limit for): each comparison is flagged when its config and phase is."""
    by = {(v.label, v.phase): v for v in verdicts}
    for c in checks:
        v = by.get((c.label, c.phase))
        c.flagged = bool(v and v.flagged)


def new_run_id(runs_dir: Path, when: dt.datetime) -> str:
    """`nightly-YYYYmmdd-HHMMSS` (UTC), with a counter when that folder (or its re-run) already exists."""
    base = "nightly-" + when.strftime("%Y%m%d-%H%M%S")
    name, n = base, 1
    while (runs_dir / name).exists() or (runs_dir / f"{name}-confirm").exists():
        n += 1
        name = f"{base}-{n}"
    return name


def run_nightly(spec: NightlySpec, progress: Callable[[str], None] | None = None) -> NightlyResult:
    """One night: sweep (or take `spec.run`), train, check against the baseline, record, report."""
    say = progress or (lambda _msg: None)
    refuse_injected()
    state = spec.state_dir
    state.mkdir(parents=True, exist_ok=True)
    started = _now()
    warnings: list[str] = []
    sweep_info: dict[str, Any] | None = None
    sweep_failed = False
    interleaved: InterleavedNight | None = None
    if spec.run is not None:
        run_dir = spec.run
        if not (run_dir / "manifest.json").is_file():
            raise EstimatorError(f"{run_dir}: not a run folder (no manifest.json)")
    else:
        new_id = new_run_id(state / "runs", started)
        settings = _interleave_settings(spec, state, warnings)
        if settings is not None:
            interleaved = run_interleaved(spec, new_id, settings, say)
            outcome = interleaved.tonight
            if interleaved.failed:
                sweep_failed = True
                warnings.append(f"interleaved sweeps failed: {', '.join(interleaved.failed)}")
            if not interleaved.verdicts:
                warnings.append("no interleaved round has both sides measured: the single-sweep rule decides")
        else:
            outcome = run_sweep(spec, new_id, say)
        run_dir = outcome.run_dir
        sweep_info = {
            "command": outcome.command,
            "returncode": outcome.returncode,
            "seconds": round(outcome.seconds, 1),
        }
        if outcome.returncode != 0:
            sweep_failed = True
            warnings.append(
                f"the sweep exited with code {outcome.returncode} (1: some points failed, see "
                f"{run_dir}/failures.jsonl; 124: timed out)"
            )
        if not (run_dir / "samples").is_dir():
            raise EstimatorError(f"the sweep wrote no samples into {run_dir} (exit code {outcome.returncode})")
    tonight = load_runs([run_dir])
    run_id = tonight.runs[0].run_id
    refuse_injected(tonight.runs[0].manifest, f"tonight's run {run_id}")
    if tonight.runs[0].status != "complete":
        sweep_failed = True
        warnings.append(f"tonight's run status is {tonight.runs[0].status!r}, not 'complete'")
    say(f"train: {run_id}")
    model_dir = state / "models" / run_id
    tonight_mape = _train(run_dir, model_dir, spec)

    # The baseline: named on the command line, else the accepted one.
    recorded = read_baseline(state)
    base: Baseline | None = None
    source = None
    if spec.baseline is not None:
        brun = load_runs([spec.baseline]).runs[0]
        if recorded is not None and recorded.run_id == brun.run_id and recorded.model_path:
            mape = recorded.held_out_mape_pct
            bmodel = recorded.model_path
        else:
            bmodel_dir = state / "models" / brun.run_id
            if not (bmodel_dir / "meta.json").is_file():
                say(f"train: baseline {brun.run_id}")
                _train(spec.baseline, bmodel_dir, spec)
            mape, bmodel = held_out_mape(bmodel_dir), str(bmodel_dir)
        base = Baseline(brun.run_id, str(spec.baseline), bmodel, mape, "", "named with --baseline")
        source = "--baseline"
    elif recorded is not None and not (Path(recorded.run_path) / "manifest.json").is_file():
        if not spec.accept:
            raise EstimatorError(
                f"the baseline run {recorded.run_path} named in {state / BASELINE_FILE} is gone: pass --baseline RUN, "
                "or --accept to start over from tonight"
            )
        warnings.append(f"the baseline run {recorded.run_path} is gone; tonight becomes the baseline (--accept)")
    elif recorded is not None:
        base, source = recorded, str(state / BASELINE_FILE)
    if base is not None and base.run_id == run_id:
        warnings.append(f"tonight's run {run_id} is the baseline itself; nothing to compare")
        base = None

    checks: list[ConfigComparison] = []
    mape_checks: list[MapeComparison] = []
    confirm_id: str | None = None
    conditions: dict[str, Any] = {"tonight": run_conditions(tonight)}
    tonight_axes = list(tonight.axes)
    axes = tonight_axes
    if base is not None:
        say(f"compare: {run_id} vs baseline {base.run_id}")
        baseline_set = load_runs([Path(base.run_path)])
        refuse_injected(baseline_set.runs[0].manifest, f"the baseline run {base.run_id}")
        axes = [a for a in baseline_set.axes if a in tonight_axes]
        if set(axes) != set(baseline_set.axes) | set(tonight_axes):
            warnings.append(
                f"the runs sweep different axes ({baseline_set.axes} vs {tonight_axes}); compared on {axes}"
            )
        diff = _spec_differences(baseline_set.runs[0].manifest, tonight.runs[0].manifest)
        if diff:
            warnings.append(f"tonight's sweep spec differs from the baseline's in: {', '.join(diff)}")
        checks, more = compare_latency(
            baseline_set, tonight, axes, spec.tolerance, spec.confidence, spec.bootstrap, spec.seed
        )
        limits = control_limits(
            read_history_lines(state / HISTORY_FILE), spec.control_k, spec.min_history, spec.default_spread
        )
        apply_history(checks, config_medians(tonight, axes), limits)
        held = [c for c in checks if c.history and c.history["bootstrap_flagged"] and not c.flagged]
        if held:
            warnings.append(
                "beyond the baseline's repeat spread but within the drift seen across accepted nights (not flagged): "
                + ", ".join(f"{c.label} {c.phase} ×{c.history['ratio_to_center']:.3f} of the nights' centre "
                            f"(limit ×{c.history['limit_ratio']:.3f})" for c in held if c.history)
            )
        conditions["baseline"] = run_conditions(baseline_set)
        if interleaved is not None and interleaved.verdicts:
            _apply_interleaved(checks, interleaved.verdicts)
        elif spec.confirm and spec.run is None and any(c.flagged for c in checks):
            confirm_id = rerun_confirm(spec, run_id, baseline_set, axes, checks, warnings, say)
        warnings += more + _model_warnings(checks)
        warnings += condition_warnings(conditions["baseline"], conditions["tonight"])
        mape_checks = compare_mape(base.held_out_mape_pct, tonight_mape, spec.mape_growth, spec.mape_min_points)
        apply_mape_history(mape_checks, read_history_lines(state / HISTORY_FILE), spec.control_k, spec.min_history)
    regression = any(c.flagged for c in checks) or any(m.flagged for m in mape_checks)
    first_night = base is None and recorded is None and spec.baseline is None
    accept = spec.accept or (first_night and not sweep_failed)
    messages = []
    if first_night:
        messages.append(
            f"no baseline yet: tonight's run {run_id} "
            + ("is accepted as the baseline" if accept else "is NOT accepted (the sweep failed)")
        )
    elif spec.accept:
        messages.append(f"--accept: tonight's run {run_id} becomes the baseline")
    improved = [f"{c.label} {c.phase}" for c in checks if c.improved]
    if improved and not spec.accept:
        messages.append(
            f"faster beyond noise: {', '.join(improved)}; if that is expected (or the baseline night was disturbed), "
            "promote tonight with --accept"
        )
    exit_code = EXIT_REGRESSION if regression else EXIT_SWEEP_FAILED if sweep_failed else EXIT_OK

    if spec.compare:
        from estimator.study.compare import CompareSpec, compare

        say(f"compare variants: {run_id}")
        try:
            compare(CompareSpec(runs=[run_dir], seed=spec.seed, cost_calls=20))
        except EstimatorError as exc:
            warnings.append(f"estimate compare failed: {exc}")

    report_dir = state / "reports" / run_id
    summary: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA,
        "night": started.isoformat(timespec="seconds"),
        "run_id": run_id,
        "run_path": str(run_dir),
        "model_path": str(model_dir),
        "report_path": str(report_dir / "report.html") if spec.report else None,
        "baseline_run_id": base.run_id if base else None,
        "baseline_run_path": base.run_path if base else None,
        "baseline_source": source,
        "confirm_run_id": confirm_id,
        "first_night": first_night,
        "accepted": accept,
        "regression": regression,
        "flagged": [f"{c.label} {c.phase}" for c in checks if c.flagged]
        + [f"estimator held-out MAPE {m.phase}" for m in mape_checks if m.flagged],
        "exit_code": exit_code,
        "rule": (
            f"latency: flag a config and phase when the {spec.confidence:.0%} bootstrap CI of median(tonight) / "
            f"median(baseline) per request lies entirely above {1 + spec.tolerance:.2f}, and tonight's median lies "
            f"above the accepted nights' centre × exp({spec.control_k:g} · s · sqrt(1 + 1/m)) (s: the spread between "
            f"nights, at least {spec.default_spread:.0%} while fewer than {spec.min_history} nights are accepted)"
            + (" in tonight's run and in a re-run" if spec.confirm else "")
            + (
                f"; interleaved night ({spec.interleave} rounds of the accepted settings and tonight's, random order, "
                f"fresh engine starts): instead, flag when the geometric mean of the rounds' median ratios exceeds "
                f"{1 + spec.tolerance:.2f} and its two-level bootstrap {spec.confidence:.0%} interval lies above 1"
                if interleaved is not None and interleaved.verdicts
                else ""
            )
            + "; estimator: flag when "
            f"held-out MAPE grew by more than {spec.mape_growth:.0%} relative and {spec.mape_min_points:g} points, "
            f"and beyond the accepted nights' MAPE centre × exp({spec.control_k:g} · s · sqrt(1 + 1/m)) (s at least "
            f"{DEFAULT_MAPE_SPREAD:.0%} while fewer than {spec.min_history} nights are accepted)"
        ),
        "thresholds": {
            "tolerance": spec.tolerance,
            "confidence": spec.confidence,
            "bootstrap": spec.bootstrap,
            "mape_growth": spec.mape_growth,
            "mape_min_points": spec.mape_min_points,
            "control_k": spec.control_k,
            "min_history": spec.min_history,
            "default_spread": spec.default_spread,
        },
        "config_axes": axes,
        "comparisons": [c.model_dump(mode="json") for c in checks],
        "estimator_checks": [m.model_dump(mode="json") for m in mape_checks],
        "held_out_mape_pct": tonight_mape,
        "conditions": conditions,
        "medians": config_medians(tonight, tonight_axes),
        "sweep": sweep_info,
        "interleaved": interleaved.as_json() if interleaved is not None else None,
        "warnings": warnings,
        "messages": list(messages),
    }
    summary = NightlySummary.model_validate(summary).as_json()  # what the report reads back, checked as written
    summary_path = state / "summaries" / f"{run_id}.json"
    write_json_atomic(summary_path, summary)
    write_json_atomic(state / LATEST_FILE, summary)
    flagged_labels = {(c.label, c.phase) for c in checks if c.flagged}
    history_path = append_history(
        state,
        HistoryLine.model_validate({
            "night": summary["night"],
            "run_id": run_id,
            "baseline_run_id": summary["baseline_run_id"],
            "regression": regression,
            "accepted": accept,
            # a night the control limits may learn from: promoted, or neither flagged nor disturbed (a flag that
            # the re-run dropped means tonight's first window was disturbed)
            "control": accept or (not regression and confirm_id is None and not sweep_failed),
            "exit_code": exit_code,
            "flagged": summary["flagged"],
            "held_out_mape_pct": tonight_mape,
            "medians": [{**m, "flagged": (m["label"], m["phase"]) in flagged_labels} for m in summary["medians"]],
        }).model_dump(mode="json"),
    )
    if accept:
        write_json_atomic(
            state / BASELINE_FILE,
            asdict(
                Baseline(
                    run_id,
                    str(run_dir),
                    str(model_dir),
                    tonight_mape,
                    _now().isoformat(timespec="seconds"),
                    "first night" if first_night else "--accept",
                    baseline_settings(spec) if spec.run is None else None,
                )
            ),
        )
    report_path = None
    if spec.report:
        say(f"report: {report_dir}")
        from estimator.report.build import ReportSpec, write_report

        try:
            files = write_report(
                ReportSpec(
                    runs=[run_dir],
                    model=model_dir,
                    out=report_dir,
                    history=history_path,
                    nightly_summary=summary_path,
                    title=f"Nightly latency report: {run_id}",
                )
            )
            report_path = files.html
            shutil.copyfile(summary_path, report_dir / "summary.json")
        except (EstimatorError, OSError, ValueError) as exc:
            messages.append(f"report failed: {exc}")
    return NightlyResult(summary, summary_path, history_path, report_path, exit_code, messages)


def format_result(result: NightlyResult) -> list[str]:
    """Human-readable lines: the verdict, one line per compared config and phase, warnings, paths."""
    s = result.summary
    lines = []
    verdict = "REGRESSION" if s["regression"] else "ok"
    base = s["baseline_run_id"] or "none"
    lines.append(f"nightly {s['run_id']} vs baseline {base}: {verdict} (exit {result.exit_code})")
    for c in s["comparisons"]:
        mark = "FLAGGED" if c["flagged"] else "improved" if c["improved"] else "ok"
        again = c.get("confirm")
        if again and again.get("ratio") is not None:
            mark += f" (re-run: ratio {again['ratio']:.3f}, CI {again['ci'][0]:.3f}-{again['ci'][1]:.3f})"
        hist = c.get("history") or {}
        if hist.get("ratio_to_center") is not None:
            mark += (
                f"  nights: ×{hist['ratio_to_center']:.3f} (limit ×{hist['limit_ratio']:.3f}, {hist['nights']} nights)"
            )
        lines.append(
            f"  {c['label']:<28} {c['phase']:<7} {c['baseline_median_ms']:9.2f} -> {c['tonight_median_ms']:9.2f} ms"
            f"  ratio {c['ratio']:.3f} (95% CI {c['ci'][0]:.3f}-{c['ci'][1]:.3f})  {mark}"
        )
    for m in s["estimator_checks"]:
        if m["growth_pct"] is not None:
            lines.append(
                f"  estimator held-out MAPE {m['phase']:<7} {m['baseline_mape_pct']:.2f}% -> "
                f"{m['tonight_mape_pct']:.2f}% ({m['growth_pct']:+.0f}%)  {'FLAGGED' if m['flagged'] else 'ok'}"
                + (f"  nights: ×{h['ratio_to_center']:.3f} (limit ×{h['limit_ratio']:.3f}, {h['nights']} nights)"
                   if (h := m.get("history") or {}).get("ratio_to_center") is not None else "")
            )
    lines += [f"warning: {w}" for w in s["warnings"]]
    lines += result.messages
    lines.append(f"summary {result.summary_path}; history {result.history_path}")
    if result.report_path:
        lines.append(f"report {result.report_path}")
    return lines

