"""The sweep: plan the grid, run each point on a real engine, and store what was measured.

The CLI builds a `SweepSpec` and `SweepOptions` and calls `run_sweep`; the same works from Python.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from harness.drivers.batch_points import is_batch_spec
from harness.drivers.budget import BudgetClock, BudgetPlan, CostCache, GroupPlan, plan_budget
from harness.drivers.measure import measure_group
from harness.drivers.plan import Plan, Reporter, SweepOptions, plan_sweep, prompt_sources
from harness.drivers.refine import GroupRefiner, refine_point
from harness.drivers.session import StopFlag, environment, stop_on_signals
from harness.engine.canary import run_canary
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
    budget, adaptive = budget_plan(plan, options)  # a budget that holds nothing fails before the folder is made
    if budget is not None:
        plan = budget.plan
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
        extra = {"adaptive": adaptive} if adaptive is not None else None
        store = open_store(plan, options, environment(source.info, spec.device), telemetry, report, extra)
        if options.engine_output is not None:
            options.engine_output.attach(store.run_dir / LOG_NAME)
        if options.canary:
            _canary(store, "before", report)
        with lock_clocks(source, options.lock_clocks_mhz), stop_on_signals() as stop:
            try:
                status = _run_points(plan, store, options, source, sources, stop, report, budget, adaptive)
            except KeyboardInterrupt:  # a second Ctrl-C: the engine is already closed, the point not written
                status = "interrupted"
        if options.canary and status == "complete":
            _canary(store, "after", report)
    return finish_sweep(store, plan, status, report)


def _canary(store: RunStore, when: str, report: Reporter) -> None:
    """Time the CPU canary now and keep it in the manifest's `canary.<when>` (a failed canary is kept as its
    error: the sweep goes on)."""
    record = run_canary()
    canary = {**(store.read_manifest().get("canary") or {}), when: record}
    store.update_manifest(canary=canary)
    if "error" in record:
        report("log", {"message": f"canary {when}: {record['error']}"})
    else:
        report("log", {"message": f"canary {when}: prefill {record['prefill']['median_ms']:.2f} ms, "
                                  f"decode {record['decode']['median_ms']:.3f} ms per pass"})


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


def budget_plan(plan: Plan, options: SweepOptions) -> tuple[BudgetPlan | None, dict[str, Any] | None]:
    """A budgeted sweep's plan (harness/drivers/budget.py) and its manifest record; (None, None) for a full grid.
    A resumed run keeps its recorded choice of engine configs and the points its refinement added."""
    if plan.spec.budget_s is None:
        return None, None
    if is_batch_spec(plan.spec):
        raise SpecError("--budget plans batch-1 points only; drop it for a spec with a batch axis")
    prior = RunStore.open(options.resume_dir).read_manifest().get("adaptive") if options.resume_dir else None
    chosen = [g["engine_config_id"] for g in prior["budget"]["chosen"]] if prior else None
    budget = plan_budget(plan, plan.spec.budget_s, CostCache.load(), chosen)
    if prior is None:
        return budget, {"budget": budget.as_dict(), "groups": {}, "spent_s": 0.0}
    known = {p.point_id for p in budget.plan.points}
    for group in prior["groups"].values():
        for entry in group["points"]:
            if entry["why"] == "refine" and entry["point_id"] not in known:
                axes = {a: entry[a] for a in plan.spec.axes}
                budget.plan.points.append(refine_point(plan.spec, axes))
                known.add(entry["point_id"])
    return budget, prior


def _run_points(
    plan: Plan,
    store: RunStore,
    options: SweepOptions,
    source: TelemetrySource,
    sources: dict[str, PromptSource],
    stop: StopFlag,
    report: Reporter,
    budget: BudgetPlan | None = None,
    adaptive: dict[str, Any] | None = None,
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
    if budget is not None and adaptive is not None:
        return _run_budgeted(plan, budget, adaptive, store, options, source, sources, stop, report, done)
    for group in todo_groups:
        outcome = measure_group(
            plan, group, options, source, sources, store, done, stop, report,
            failed_before=failed, engine_factory=VllmEngine,  # looked up here, so tests can patch it
        )
        failed += outcome.failed
        if outcome.status != "done":
            return outcome.status
    return "complete" if failed == 0 else "failed"


def _run_budgeted(
    plan: Plan, budget: BudgetPlan, adaptive: dict[str, Any], store: RunStore, options: SweepOptions,
    source: TelemetrySource, sources: dict[str, PromptSource], stop: StopFlag, report: Reporter, done: set[str],
) -> str:
    """A budgeted sweep: the chosen engine configs one by one, each refined within its share, and the choice of
    the configs not yet started made again after each with what this machine has measured since."""
    clock = BudgetClock(budget, float(adaptive.get("spent_s", 0.0)))
    started = {g.engine_config_id for g in budget.chosen if all(p.point_id in done for p in g.coarse)}
    failed = 0
    while (nxt := next((g for g in budget.chosen if g.engine_config_id not in started), None)) is not None:
        started.add(nxt.engine_config_id)
        group = [p for p in nxt.coarse if p.point_id not in done]
        if group:
            refine, t0 = _refiner(clock, nxt, store, adaptive, started, report), time.monotonic()
            outcome = measure_group(
                plan, group, options, source, sources, store, done, stop, report,
                failed_before=failed, engine_factory=VllmEngine, refine=refine,
            )
            log = refine.log
            log["group_s"] = round(time.monotonic() - t0, 2)
            log["start_and_coarse_s"] = round(log["group_s"] - log.get("refine_s", 0.0) - log.get("fit_s", 0.0), 2)
            failed += outcome.failed
            if outcome.status != "done":
                adaptive["spent_s"] = round(clock.spent_s(), 2)
                store.update_manifest(adaptive=adaptive)
                return outcome.status
        budget.replan(started, clock.left_s(), CostCache.load())
        adaptive["budget"]["chosen"] = [g.as_dict() for g in budget.chosen]
        adaptive["budget"]["skipped"] = [g.as_dict() for g in budget.skipped]
        adaptive["spent_s"] = round(clock.spent_s(), 2)
        store.update_manifest(adaptive=adaptive, points_total=len(plan.points))
    return "complete" if failed == 0 else "failed"


def _refiner(
    clock: BudgetClock, g: GroupPlan, store: RunStore, adaptive: dict[str, Any], started: set[str], report: Reporter
) -> GroupRefiner:
    """The refinement hook of one engine config, its manifest record started with the coarse points."""
    budget = clock.budget
    log = adaptive["groups"].setdefault(g.engine_config_id, {**g.engine_values, "points": []})
    logged = {e["point_id"] for e in log["points"]}
    log["points"] += [{"point_id": p.point_id, **p.axes, "why": "coarse"} for p in g.coarse if p.point_id not in logged]

    def save() -> None:
        adaptive["spent_s"] = round(clock.spent_s(), 2)
        store.update_manifest(adaptive=adaptive)

    def replan() -> None:
        budget.replan(started, clock.left_s(), CostCache.load())
        adaptive["budget"]["chosen"] = [c.as_dict() for c in budget.chosen]
        adaptive["budget"]["skipped"] = [c.as_dict() for c in budget.skipped]

    return GroupRefiner(budget, clock, g, store, log, save, replan, report)


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
