"""The sweep: plan the grid, run each point on a real engine, and store what was measured.

The CLI builds a `SweepSpec` and `SweepOptions` and calls `run_sweep`; the same works from Python.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from harness.drivers.measure import measure_group
from harness.drivers.plan import Plan, Reporter, SweepOptions, plan_sweep, prompt_sources
from harness.drivers.session import StopFlag, environment, stop_on_signals
from harness.engine.log import LOG_NAME
from harness.engine.vllm_engine import VllmEngine
from harness.rundata.prompts import PromptSource
from harness.rundata.spec import SpecError, SweepSpec, build_spec
from harness.rundata.store import RunStore, check_writable, utc_now
from harness.telemetry.sources import TelemetrySource, lock_clocks, nvml_device_count, open_source


@dataclass
class SweepResult:
    run_dir: Path
    status: str
    points_done: int
    points_failed: int
    summary: pd.DataFrame
    figures: dict[str, Any]



def _select_gpu(gpu: int | None) -> None:
    """Make GPU `gpu` (an index in this process's CUDA view) the only device vLLM sees."""
    if gpu is None:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        os.environ["CUDA_VISIBLE_DEVICES"] = entries[gpu]
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


def run_sweep(spec: SweepSpec, options: SweepOptions, report: Reporter) -> SweepResult:
    """Run (or resume) a sweep; `report(event, data)` receives progress events for display.

    Bad input (spec, prompts, an unwritable or full output folder, a GPU that is not there) fails here with
    SpecError/StoreError/TelemetryError before a run folder is written or an engine started.
    """
    plan = plan_sweep(spec)
    sources = prompt_sources(plan)
    if options.resume_dir is None:
        check_writable(options.out_root)
    with open_source(options.gpu) as source:
        _select_gpu(options.gpu)
        telemetry = {
            "source": source.name,
            "reason": source.reason
            if source.name == "nvml"
            else f"{source.reason}; NVML sees {nvml_device_count()} GPU(s), so host counters stand in",
            "interval_ms": spec.telemetry_interval_ms,
            "power_field": source.info.get("power_field"),
            "clocks_locked_mhz": options.lock_clocks_mhz,
        }
        store = open_store(plan, options, environment(source.info, spec.device), telemetry, report)
        if options.engine_output is not None:
            options.engine_output.attach(store.run_dir / LOG_NAME)
        with lock_clocks(source, options.lock_clocks_mhz), stop_on_signals() as stop:
            try:
                status = _run_points(plan, store, options, source, sources, stop, report)
            except KeyboardInterrupt:  # a second Ctrl-C: the engine is already closed, the point not written
                status = "interrupted"
    return finish_sweep(store, plan, status, report)


def open_store(
    plan: Plan,
    options: SweepOptions,
    env: dict[str, Any],
    telemetry: dict[str, Any],
    report: Reporter,
    extra: dict[str, Any] | None = None,
) -> RunStore:
    """Create the run folder with its first manifest, or reopen it for --resume (dropping unfinished writes and
    refusing a run made with another spec). `extra` adds manifest keys (a Ray run's `cluster`)."""
    spec = plan.spec
    if options.resume_dir is not None:
        store = RunStore.open(options.resume_dir)
        for p in store.discard_partial():
            report("log", {"message": f"discarded unfinished write {p.relative_to(store.run_dir)}"})
        manifest = store.update_manifest(
            status="running", resumed_at=utc_now(), resume_command=options.command, **(extra or {})
        )
        if build_spec(manifest.get("spec") or {}) != spec:
            raise SpecError(
                f"--resume: the run in {options.resume_dir} was made with another spec; resume it "
                "with the same flags (or none: the saved spec is used)"
            )
        return store
    return RunStore.new(
        "sweep", options, spec, env,
        telemetry=telemetry,
        engine_mode=spec.engine_mode,
        points_total=len(plan.points),
        points_done=0,
        points_failed=0,
        engine_starts=[],
        models={str(t): m.__dict__ for t, m in plan.models.items()},
        **(extra or {}),
    )


def _run_points(
    plan: Plan,
    store: RunStore,
    options: SweepOptions,
    source: TelemetrySource,
    sources: dict[str, PromptSource],
    stop: StopFlag,
    report: Reporter,
) -> str:
    done = store.done_points()
    todo_groups = [[p for p in g if p.point_id not in done] for g in plan.groups]
    todo_groups = [g for g in todo_groups if g]
    report(
        "start",
        {
            "run_dir": store.run_dir,
            "points_total": len(plan.points),
            "points_done": len(done),
            "engine_starts": len(todo_groups),
        },
    )
    failed = 0  # in this attempt; a resumed run retries earlier failures
    for group in todo_groups:
        outcome = measure_group(
            plan, group, options, source, sources, store, done, stop, report,
            failed_before=failed, engine_factory=VllmEngine,  # looked up here, so tests can patch it
        )
        failed += outcome.failed
        if outcome.status != "done":
            return outcome.status
    return "complete" if failed == 0 else "failed"


def finish_sweep(store: RunStore, plan: Plan, status: str, report: Reporter) -> SweepResult:
    table = store.read_table("samples")
    samples = table.to_pandas() if table is not None else pd.DataFrame()
    figures = overhead_figures(samples)
    summary = summarize(samples, plan.spec)
    manifest = store.update_manifest(status=status, ended_at=utc_now(), summary=figures)
    done = len(store.done_points())
    if status == "failed" and done == len(plan.points):
        status = "complete"  # every failure of an earlier attempt was measured on resume
    manifest = store.update_manifest(
        status=status, points_done=done, points_failed=len(plan.points) - done if status != "interrupted" else 0
    )
    result = SweepResult(store.run_dir, status, done, int(manifest["points_failed"]), summary, figures)
    done_ids = store.done_points()
    report("end", {"result": result, "failures": [f for f in store.failures() if f["point_id"] not in done_ids]})
    return result


def overhead_figures(samples: pd.DataFrame) -> dict[str, Any]:
    """Caller step time over the engine core's own iteration time, per phase (median ratio). None in-process:
    there the engine's time covers only the iteration's sampling tail (docs/results-schema.md)."""
    out: dict[str, Any] = {"rows": len(samples)}
    if samples.empty or "engine_elapsed_ms" not in samples:
        return out
    if "engine_mode" in samples and (samples.engine_mode == "inprocess").any():
        out["harness_over_engine"] = "not reported in-process: the engine's own time covers only sampling"
        return out
    for phase in ("prefill", "decode"):
        s = samples[(samples.phase == phase) & samples.engine_elapsed_ms.notna() & (samples.engine_elapsed_ms > 0)]
        if len(s):
            out[f"{phase}_harness_over_engine_ratio"] = round(float((s.latency_ms / s.engine_elapsed_ms).median()), 4)
            out[f"{phase}_harness_minus_engine_ms"] = round(float((s.latency_ms - s.engine_elapsed_ms).median()), 4)
    return out


def _cv(x: pd.Series) -> float:
    return float(x.std(ddof=1) / x.mean()) if len(x) > 1 and x.mean() > 0 else float("nan")


def summarize(samples: pd.DataFrame, spec: SweepSpec) -> pd.DataFrame:
    """Per tier and config: prefill median (ms) at the shortest, a middle and the longest length, the mean CV of
    prefill across different prompts of one length (%), decode median (ms), and the median CV of decode at equal
    position across different prompts (%)."""
    if samples.empty:
        return pd.DataFrame()
    config = [a for a in spec.axes if a != "text_tokens"]
    lengths = sorted(samples.text_tokens.unique())
    shown = sorted({lengths[0], lengths[len(lengths) // 2], lengths[-1]})
    rows = []
    for key, g in samples.groupby([*config, "model"], sort=True):
        pre = g[g.phase == "prefill"]
        distinct = g[g.prompt_kind == "distinct"]
        row: dict[str, Any] = dict(zip([*config, "model"], key if isinstance(key, tuple) else (key,), strict=True))
        for n in shown:
            row[f"prefill@{n}"] = round(float(pre[pre.text_tokens == n].latency_ms.median()), 2)
        cvs = distinct[distinct.phase == "prefill"].groupby("text_tokens").latency_ms.agg(_cv).dropna()
        row["prefill_cv%"] = round(100 * float(cvs.mean()), 1) if len(cvs) else float("nan")
        dec = distinct[distinct.phase == "decode"]
        row["decode_ms"] = round(float(g[g.phase == "decode"].latency_ms.median()), 2)
        row["decode_cv%"] = round(100 * float(dec.groupby(["text_tokens", "position"]).latency_ms.agg(_cv).median()), 1)
        rows.append(row)
    return pd.DataFrame(rows)
