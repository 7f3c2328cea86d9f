"""One engine-config group measured on one device: engine starts, warm-up, and the interleaved requests.

`measure_group` is what a single-device sweep (harness/drivers/sweep.py) runs for each group, and what a Ray
worker (harness/drivers/cluster.py) runs for the group it is given. Where the results go is the `store` argument's
business: the run folder's RunStore, or a worker's stand-in that sends every write to the driver.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from harness.drivers.batch_points import is_batch_spec, run_batch_group
from harness.drivers.budget import CostCache, cost_key
from harness.drivers.plan import Plan, Reporter, SweepOptions
from harness.drivers.session import (
    StopFlag,
    engine_settings,
    record_engine_start,
    record_engine_threads,
    sampling_of,
    start_engine,
    warm_up,
)
from harness.engine.device import cpu_model
from harness.engine.log import LOG_NAME, count_levels, start_phases
from harness.engine.settings import EngineSettings
from harness.engine.vllm_engine import EngineError, MeasurementError, RequestRecord, VllmEngine
from harness.rundata.prompts import Prompt, PromptSource
from harness.rundata.spec import Point, SweepSpec
from harness.rundata.store import RunStore
from harness.telemetry.sampler import TelemetrySampler
from harness.telemetry.sources import TelemetrySource, join_snapshots, telemetry_frame


@dataclass
class GroupOutcome:
    """How one group's measuring ended: `done` (every point written or failed), `interrupted` (a stop signal),
    or `failed` (--fail-fast stopped at a failure); `failed` counts the points that failed."""

    status: str
    failed: int


@dataclass
class PassOutcome:
    """How one pass over some points of a running engine ended: `status` None (go on: every point written or
    failed, or the engine died and the caller restarts it for the points left), `interrupted` or `failed`
    (--fail-fast); `failed` counts its failed points, `written` holds the samples of the points it wrote."""

    status: str | None
    failed: int
    written: list[pd.DataFrame]


Refine = Callable[[str, Callable[[list[Point], "int | None"], PassOutcome]], PassOutcome]


def measure_group(
    plan: Plan,
    group: list[Point],
    options: SweepOptions,
    source: TelemetrySource,
    sources: dict[str, PromptSource],
    store: RunStore,
    done: set[str],
    stop: StopFlag,
    report: Reporter,
    *,
    failed_before: int = 0,
    engine_factory: Callable[[EngineSettings], VllmEngine] = VllmEngine,
    refine: Refine | None = None,
) -> GroupOutcome:
    """Measure the points of one engine-config group (all not yet done): start its engine (again after an engine
    death, for the points left), warm up, run every request in one interleaved order and write each point when
    its last request is done. `done` gains each written point; `failed_before` only feeds the manifest count.
    `refine(dtype, run)`, when given, runs once every point of the group is written, before the engine stops:
    it may `run` more points on the same engine (a budgeted sweep's refinement, harness/drivers/budget.py)."""
    spec = plan.spec
    failed = 0
    first = group[0]
    settings = engine_settings(plan, first, options)
    m = plan.models[int(first.axes["tier"])]
    prompts = sources[m.path]
    remaining = list(group)
    while remaining:  # one pass per engine start; an engine that dies is restarted for the rest
        engine = engine_factory(settings)
        try:  # the engine is closed however this pass ends (failure, Ctrl-C, a second Ctrl-C)
            try:
                log = options.engine_output
                log_offset = log.offset() if log else 0
                started_at = time.time()
                started = start_engine(engine, spec, first)
                seconds, effective = started.seconds, started.effective
                text = log.text_since(log_offset) if log else ""
                warnings, errors = count_levels(text)
                record_engine_start(
                    store,
                    {
                        "engine_config_id": first.engine_config_id,
                        "model": m.name,
                        "block_size": effective["block_size"],
                        "seconds": round(seconds, 2),
                        "phases_s": start_phases(text, started_at, seconds),
                        "log_warnings": warnings,
                        "log_errors": errors,
                        "effective": effective,
                    },
                    engine.exceptions,
                )
                CostCache.load().record(cost_key(plan, m.tier), start_s=seconds)
                if started.mismatch:
                    raise MeasurementError(started.mismatch)
                report(
                    "engine",
                    {
                        "model": m.name,
                        "block_size": effective["block_size"],
                        "seconds": seconds,
                        "points": len(remaining),
                        "log_warnings": warnings,
                        "log_errors": errors,
                    },
                )
                if stop.signal is None:
                    warm_up(engine, prompts, plan, remaining)
                engine.watch.begin()  # where each thread runs, and waits, while this start measures
            except (EngineError, MeasurementError) as e:
                if stop.signal is not None:  # Ctrl-C in a terminal reaches the engine core too: not a failure
                    return GroupOutcome("interrupted", failed)
                for p in remaining:
                    _fail(store, p, e, report)
                failed += len(remaining)
                store.update_manifest(points_failed=failed_before + failed)
                if options.fail_fast:
                    return GroupOutcome("failed", failed)
                break
            if is_batch_spec(spec):  # several requests in flight (harness/drivers/batch_points.py)
                outcome = run_batch_group(
                    engine, spec, remaining, prompts, source, store, model=m.name,
                    device=source.info.get("device_name") or cpu_model(), done=done, total=len(plan.points),
                    stop=lambda: stop.signal is not None, fail=lambda p, e: _fail(store, p, e, report),
                    fail_fast=options.fail_fast, report=report,
                )
                failed += outcome.failed
                store.update_manifest(points_failed=failed_before + failed)
                if outcome.status in ("interrupted", "fail_fast"):
                    return GroupOutcome("interrupted" if outcome.status == "interrupted" else "failed", failed)
                continue  # done, or an engine restart for the points left
            # every request of this engine start in one seeded, interleaved order; a point is written once
            # all its requests are done (so a kill or Ctrl-C loses only unfinished points)
            passed = _run_pass(
                engine, plan, prompts, source, store, done, stop, report, options, failed_before + failed, remaining
            )
            failed += passed.failed
            if passed.status is not None:
                return GroupOutcome(passed.status, failed)
            if not remaining and refine is not None and stop.signal is None:
                run = functools.partial(
                    _run_pass, engine, plan, prompts, source, store, done, stop, report, options, failed_before + failed
                )
                passed = refine(engine.dtype, run)
                failed += passed.failed
                if passed.status is not None:
                    return GroupOutcome(passed.status, failed)
        finally:
            if engine.watch.begun:
                record_engine_threads(store, first.engine_config_id, engine.watch.end())
            engine.close()
    return GroupOutcome("done", failed)


def _run_pass(
    engine: VllmEngine,
    plan: Plan,
    prompts: PromptSource,
    source: TelemetrySource,
    store: RunStore,
    done: set[str],
    stop: StopFlag,
    report: Reporter,
    options: SweepOptions,
    failed_before: int,
    points: list[Point],
    same_repeats: int | None = None,
) -> PassOutcome:
    """Run `points` (removed from the list as each is written or fails) on a started engine, in one interleaved
    order; `same_repeats` overrides the spec's same-prompt repeats (refinement points have none)."""
    spec = plan.spec
    failed, written = 0, list[pd.DataFrame]()
    batch = _EnginePass(plan, points, prompts, source, store.run_dir.name, engine.dtype, same_repeats)
    if same_repeats is None:  # a refinement round says what it measures itself
        report(
            "log",
            {
                "message": f"measuring {len(batch.order)} requests of {len(points)} points in one "
                "interleaved order (points are written as their last request finishes)"
            },
        )
    sampler = TelemetrySampler(source, spec.telemetry_interval_ms, spec.telemetry_mode)
    with sampler if spec.telemetry else contextlib.nullcontext():
        for req in batch.order:
            point = req.point
            if stop.signal is not None:
                return PassOutcome("interrupted", failed, written)
            if point not in points:  # it failed earlier in this pass
                continue
            try:
                record = engine.run_request(
                    f"{point.point_id}-{req.rep}",
                    batch.prompt(req).token_ids,
                    spec.max_new_tokens,
                    sampling_of(spec, point),
                )
            except (MeasurementError, EngineError) as e:
                if stop.signal is not None:
                    return PassOutcome("interrupted", failed, written)
                points.remove(point)
                batch.drop(point)
                _fail(store, point, e, report)
                failed += 1
                store.update_manifest(points_failed=failed_before + failed)
                if options.fail_fast:
                    return PassOutcome("failed", failed, written)
                if isinstance(e, EngineError):
                    report("log", {"message": "restarting the engine for the rest of its points"})
                    break  # the caller restarts the engine for the rest of the group
                continue
            report("request", {"seq": req.seq, "of": len(batch.order)})
            if not batch.add(req, record, sampler.drain()):
                continue
            tables, figures = batch.tables(point)
            store.write_point(point.point_id, tables)
            written.append(tables["samples"].to_pandas())
            points.remove(point)
            done.add(point.point_id)
            store.update_manifest(points_done=len(done), points_failed=failed_before + failed)
            report("point", {"point": point, "done": len(done), "total": len(plan.points), **figures})
    return PassOutcome(None, failed, written)


def _fail(store: RunStore, point: Point, error: Exception, report: Reporter) -> None:
    store.record_failure(
        {
            "point_id": point.point_id,
            "engine_config_id": point.engine_config_id,
            "axes": point.axes,
            "error_type": type(error).__name__,
            "error": str(error),
        }
    )
    log = store.run_dir / LOG_NAME
    engine_log = log if isinstance(error, EngineError) and log.is_file() else None
    report("failure", {"point": point, "error": f"{type(error).__name__}: {error}", "engine_log": engine_log})


@dataclass(frozen=True)
class PlannedRequest:
    """One timed request: its place in the engine start's order (`seq`, 0-based), its point, and `rep`, its index
    within the point (0..reps-1: distinct prompts; then the repeats of one prompt)."""

    seq: int
    point: Point
    rep: int


def request_order(spec: SweepSpec, points: list[Point], key: str, n: int | None = None) -> list[PlannedRequest]:
    """The order in which one engine start runs its points' requests: seeded by (spec.seed, key), interleaved.

    Requests go in rounds: round r holds one request of every point, in a shuffled order, and each point's own
    requests (distinct prompts and same-prompt repeats) are shuffled over the rounds. So every point spans the
    whole engine start: slow drift (heat, clocks, memory) lands on every length and sampling config alike
    instead of on whichever ran last.
    """
    rng = random.Random(f"{spec.seed}:order:{key}")
    n = spec.requests_per_point if n is None else n
    reps = {p.point_id: rng.sample(range(n), n) for p in points}
    order: list[tuple[Point, int]] = []
    for r in range(n):
        round_ = [(p, reps[p.point_id][r]) for p in points]
        rng.shuffle(round_)
        order += round_
    return [PlannedRequest(seq, p, rep) for seq, (p, rep) in enumerate(order)]


class _EnginePass:
    """One engine start's requests: their order, their prompts, and each point's rows until it is complete."""

    def __init__(
        self, plan: Plan, points: list[Point], prompts: PromptSource, source: TelemetrySource, run_id: str,
        dtype: str, same_repeats: int | None = None,
    ) -> None:
        spec = self.spec = plan.spec
        self.plan, self.source, self.run_id, self.dtype = plan, source, run_id, dtype
        same_n = spec.same_prompt_repeats if same_repeats is None else same_repeats
        first = points[0]
        key = first.engine_config_id if same_repeats is None else f"{first.engine_config_id}:{first.point_id}"
        self.order = request_order(spec, points, key, spec.reps + same_n)
        self.prompts: dict[str, list[tuple[Prompt, str]]] = {}
        for p in points:  # cut per point as before the interleaving: a resumed run cuts the same prompts
            prompts.reseed(p.point_id)
            plist = [(prompts.cut(p.text_tokens, i), "distinct") for i in range(spec.reps)]
            if same_n:
                same = prompts.cut(p.text_tokens, spec.reps)
                plist += [(same, "same")] * same_n
            self.prompts[p.point_id] = plist
        self.rows: dict[str, list[dict[str, Any]]] = {p.point_id: [] for p in points}
        self.left = {p.point_id: spec.reps + same_n for p in points}
        self.telemetry: list[dict[str, Any]] = []  # every sample of this pass (snapshots join against it)
        self.unwritten: list[dict[str, Any]] = []  # samples not yet in a telemetry file
        self.device_name = source.info.get("device_name") or cpu_model()

    def prompt(self, req: PlannedRequest) -> Prompt:
        return self.prompts[req.point.point_id][req.rep][0]

    def drop(self, point: Point) -> None:
        self.rows.pop(point.point_id, None)
        self.left.pop(point.point_id, None)

    def add(self, req: PlannedRequest, rec: RequestRecord, telemetry: list[dict[str, Any]]) -> bool:
        """Keep one finished request's rows; True when its point has all its requests."""
        self.telemetry += telemetry
        self.unwritten += telemetry
        point, spec = req.point, self.spec
        prompt, kind = self.prompts[point.point_id][req.rep]
        model = self.plan.models[int(point.axes["tier"])].name
        for s in rec.steps:
            self.rows[point.point_id].append(
                {
                    "run_id": self.run_id,
                    "point_id": point.point_id,
                    "engine_config_id": point.engine_config_id,
                    "rep": req.rep,
                    "seq": req.seq,
                    "prompt_kind": kind,
                    "prompt_id": prompt.prompt_id,
                    **point.axes,
                    "model": model,
                    "phase": "prefill" if s.step_index == 0 else "decode",
                    "text_tokens": rec.received_tokens,
                    "position": s.kv_tokens if s.kv_tokens is not None else point.text_tokens + s.step_index,
                    "step_index": s.step_index,
                    "latency_ms": s.latency_ms,
                    "engine_elapsed_ms": s.engine_elapsed_ms,
                    "step_calls": s.step_calls,
                    "client_lagged": s.client_lagged,
                    "prefill_iterations": s.prefill_iterations,
                    "prefill_chunk": s.prefill_chunk,
                    "t_start_s": s.t_start_s,
                    "t_end_s": s.t_end_s,
                    "max_new_tokens": spec.max_new_tokens,
                    "batch_size": 1,
                    "engine_mode": spec.engine_mode,
                    "dtype": self.dtype,
                    "device": self.device_name,
                }
            )
        self.left[point.point_id] -= 1
        return self.left[point.point_id] == 0

    def tables(self, point: Point) -> tuple[dict[str, pa.Table], dict[str, Any]]:
        """A complete point's tables and headline figures. Its telemetry file holds the samples taken since the
        previous point was written (each sample is stored once; the snapshots join against the whole pass)."""
        rows = self.rows.pop(point.point_id)
        self.left.pop(point.point_id)
        rows.sort(key=lambda r: (r["rep"], r["step_index"], r["prefill_chunk"]))
        samples = join_snapshots(pd.DataFrame(rows), telemetry_frame(self.telemetry, self.source.name))
        seen: set[str] = set()
        prompt_rows = []
        for prompt, kind in self.prompts[point.point_id]:
            if prompt.prompt_id in seen:
                continue
            seen.add(prompt.prompt_id)
            prompt_rows.append(
                {
                    "prompt_id": prompt.prompt_id,
                    "text": prompt.text,
                    "text_tokens": prompt.text_tokens,
                    "token_ids": prompt.token_ids,
                    "source": prompt.source,
                    "content_class": prompt.content_class,
                    "prompt_kind": kind,
                    "point_id": point.point_id,
                }
            )
        tables = {
            "samples": pa.Table.from_pandas(samples, preserve_index=False),
            "prompts": pa.Table.from_pylist(prompt_rows),
        }
        telemetry = telemetry_frame(self.unwritten, self.source.name)
        self.unwritten = []
        if not telemetry.empty:
            telemetry.insert(0, "point_id", point.point_id)
            tables["telemetry"] = pa.Table.from_pandas(telemetry, preserve_index=False)
        pre = samples.loc[samples.phase == "prefill", "latency_ms"]
        dec = samples.loc[samples.phase == "decode", "latency_ms"]
        return tables, {"prefill_ms": float(pre.median()), "decode_ms": float(dec.median())}
