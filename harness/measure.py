"""One engine-config group measured on one device: engine starts, warm-up, and the interleaved requests.

`measure_group` is what a single-device sweep (harness/sweep.py) runs for each group, and what a Ray worker
(harness/cluster.py) runs for the group it is given. Where the results go is the `store` argument's business: the
run folder's RunStore, or a worker's stand-in that sends every write to the driver.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from harness.batch_points import is_batch_spec, run_batch_group
from harness.device import cpu_model
from harness.engine import (
    EngineError,
    EngineSettings,
    MeasurementError,
    RequestRecord,
    VllmEngine,
)
from harness.engine_log import LOG_NAME, EngineOutput
from harness.prompts import Prompt, PromptSource
from harness.sampler import TelemetrySampler
from harness.spec import Point, SweepSpec, engine_axes
from harness.store import RunStore
from harness.telemetry import TelemetrySource, join_snapshots, telemetry_frame

ESTIMATE = {
    "cpu": {"flops": 40e9, "step_overhead_s": 0.002, "engine_start_s": 30.0},
    "cuda": {"flops": 150e12, "step_overhead_s": 0.004, "engine_start_s": 90.0},
}


@dataclass
class SweepOptions:
    """How to run a sweep (not what to measure: that is the spec)."""

    out_root: Path = Path("results")
    resume_dir: Path | None = None
    run_id: str | None = None
    gpu: int | None = None
    fail_fast: bool = False
    lock_clocks_mhz: int | None = None
    verbose: bool = False
    engine_output: EngineOutput | None = None  # where the engine's own output goes (engine.log); None: untouched
    command: list[str] = field(default_factory=lambda: list(sys.argv))


@dataclass
class TierModel:
    """A tier's model: name, local path, and the config facts the sweep checks against."""

    tier: int
    name: str
    path: str
    vocab_size: int
    max_context: int
    params: int


@dataclass
class Plan:
    spec: SweepSpec
    points: list[Point]
    groups: list[list[Point]]
    models: dict[int, TierModel]

    def estimated_seconds(self) -> float:
        """A rough duration: engine starts plus model FLOPs at a nominal throughput (for --dry-run)."""
        est = ESTIMATE[self.spec.device]
        total = est["engine_start_s"] * len(self.groups)
        reqs = self.spec.requests_per_point
        for p in self.points:
            m = self.models[int(p.axes["tier"])]
            n, new = p.text_tokens, self.spec.max_new_tokens
            work, runs = n + new, reqs
            if "batch" in p.axes:  # batch points: `reps` episodes of B sequences (+ a joiner)
                work, runs = int(p.axes["batch"]) * (n + new) + int(p.axes.get("batch_join_tokens", 0)), self.spec.reps
            total += runs * (2 * m.params * work / est["flops"] + new * est["step_overhead_s"])
        return total


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the sweep stops after the current request and marks the run interrupted."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum


def _engine_settings(plan: Plan, point: Point, options: SweepOptions) -> EngineSettings:
    spec = plan.spec
    m = plan.models[int(point.axes["tier"])]
    kwargs: dict[str, Any] = dict(spec.engine)
    if spec.max_num_seqs is not None:
        kwargs["max_num_seqs"] = spec.max_num_seqs
    hf: dict[str, Any] = {}
    block_size = None
    for axis in engine_axes(spec):
        target = spec.mapping[axis]
        value = point.axes[axis]
        if target == "engine:block_size":
            block_size = int(value)
        elif target.startswith("engine:"):
            kwargs[target.split(":", 1)[1]] = value
        elif target.startswith("hf:"):
            hf[target.split(":", 1)[1]] = value
    return EngineSettings(
        model_name=m.name,
        model_path=m.path,
        device=spec.device,
        block_size=block_size,
        longest_prompt=max(spec.axes["text_tokens"]),
        mode=spec.engine_mode,
        sampling_seed=spec.sampling_seed,
        engine_kwargs=kwargs,
        hf_overrides=hf,
        trust_remote_code=spec.trust_remote_code,
        # with engine.log catching it, vLLM logs at its own level; otherwise only errors, unless --verbose
        verbose=options.verbose or options.engine_output is not None,
        gc_guard=spec.gc_guard,
        cpu_pinning=spec.cpu_pinning,
        allow_chunked_prefill=spec.allow_chunked_prefill,
    )


def _sampling(spec: SweepSpec, point: Point) -> dict[str, Any]:
    return {
        spec.mapping[a].split(":", 1)[1]: v for a, v in point.axes.items() if spec.mapping[a].startswith("sampling:")
    }


Reporter = Callable[[str, dict[str, Any]], None]


@dataclass
class GroupOutcome:
    """How one group's measuring ended: `done` (every point written or failed), `interrupted` (a stop signal),
    or `failed` (--fail-fast stopped at a failure); `failed` counts the points that failed."""

    status: str
    failed: int


def record_engine_start(store: Any, entry: dict[str, Any], exceptions: list[dict[str, Any]]) -> None:
    """Append one engine start to the manifest (a worker's store stand-in forwards it to the driver)."""
    if hasattr(store, "add_engine_start"):
        store.add_engine_start(entry, exceptions)
        return
    starts = store.read_manifest().get("engine_starts", [])
    store.update_manifest(
        engine_defaults="vLLM's for `vllm serve` (UsageContext.OPENAI_API_SERVER) on this model "
        "and device, except engine_exceptions and the spec's own [engine] entries and axes",
        engine_exceptions=exceptions,
        engine_starts=[*starts, entry],
    )


def measure_group(
    plan: Plan,
    group: list[Point],
    options: SweepOptions,
    source: TelemetrySource,
    sources: dict[str, PromptSource],
    store: RunStore,
    done: set[str],
    stop: _StopFlag,
    report: Reporter,
    *,
    failed_before: int = 0,
    engine_factory: Callable[[EngineSettings], VllmEngine] = VllmEngine,
) -> GroupOutcome:
    """Measure the points of one engine-config group (all not yet done): start its engine (again after an engine
    death, for the points left), warm up, run every request in one interleaved order and write each point when
    its last request is done. `done` gains each written point; `failed_before` only feeds the manifest count."""
    spec = plan.spec
    failed = 0
    first = group[0]
    settings = _engine_settings(plan, first, options)
    m = plan.models[int(first.axes["tier"])]
    prompts = sources[m.path]
    remaining = list(group)
    while remaining:  # one pass per engine start; an engine that dies is restarted for the rest
        engine = engine_factory(settings)
        try:  # the engine is closed however this pass ends (failure, Ctrl-C, a second Ctrl-C)
            try:
                log = options.engine_output
                log_offset = log.offset() if log else 0
                seconds = engine.start()
                warnings, errors = log.levels_since(log_offset) if log else (0, 0)
                effective = engine.effective_config()
                record_engine_start(
                    store,
                    {
                        "engine_config_id": first.engine_config_id,
                        "model": m.name,
                        "block_size": effective["block_size"],
                        "seconds": round(seconds, 2),
                        "log_warnings": warnings,
                        "log_errors": errors,
                        "effective": effective,
                    },
                    engine.exceptions,
                )
                mismatch = _effective_mismatch(spec, first, engine)
                if mismatch:
                    raise MeasurementError(mismatch)
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
                    _warm_up(engine, prompts, plan, remaining)
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
            if is_batch_spec(spec):  # several requests in flight (harness/batch_points.py)
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
            batch = _EnginePass(plan, remaining, prompts, source, store.run_dir.name, engine.dtype)
            report(
                "log",
                {
                    "message": f"measuring {len(batch.order)} requests of {len(remaining)} points in one "
                    "interleaved order (points are written as their last request finishes)"
                },
            )
            sampler = TelemetrySampler(source, spec.telemetry_interval_ms, spec.telemetry_mode)
            with sampler if spec.telemetry else contextlib.nullcontext():
                for req in batch.order:
                    point = req.point
                    if stop.signal is not None:
                        return GroupOutcome("interrupted", failed)
                    if point not in remaining:  # it failed earlier in this pass
                        continue
                    try:
                        record = engine.run_request(
                            f"{point.point_id}-{req.rep}",
                            batch.prompt(req).token_ids,
                            spec.max_new_tokens,
                            _sampling(spec, point),
                        )
                    except (MeasurementError, EngineError) as e:
                        if stop.signal is not None:
                            return GroupOutcome("interrupted", failed)
                        remaining.remove(point)
                        batch.drop(point)
                        _fail(store, point, e, report)
                        failed += 1
                        store.update_manifest(points_failed=failed_before + failed)
                        if options.fail_fast:
                            return GroupOutcome("failed", failed)
                        if isinstance(e, EngineError):
                            report("log", {"message": "restarting the engine for the rest of its points"})
                            break  # restart the engine for the rest of the group
                        continue
                    report("request", {"seq": req.seq, "of": len(batch.order)})
                    if not batch.add(req, record, sampler.drain()):
                        continue
                    tables, figures = batch.tables(point)
                    store.write_point(point.point_id, tables)
                    remaining.remove(point)
                    done.add(point.point_id)
                    store.update_manifest(points_done=len(done), points_failed=failed_before + failed)
                    report("point", {"point": point, "done": len(done), "total": len(plan.points), **figures})
        finally:
            engine.close()
    return GroupOutcome("done", failed)


def _effective_mismatch(spec: SweepSpec, point: Point, engine: VllmEngine) -> str | None:
    """A message naming both values when the running engine's config differs from an engine-level axis value
    (vLLM or its platform adjusted it: e.g. the CPU platform turns async scheduling off)."""
    dtype = engine.dtype_mismatch()
    if dtype:
        return dtype
    for axis in engine_axes(spec):
        target = spec.mapping[axis]
        if target == "model":
            continue
        found, value = engine.effective_value(target)
        if found and value != point.axes[axis]:
            key = target.partition(":")[2]
            return (
                f"the running engine has {key} = {value!r}, but axis {axis} = {point.axes[axis]!r} asked for it "
                f"({target}); vLLM or its platform changed it"
            )
    return None


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


def _warm_up(engine: VllmEngine, prompts: PromptSource, plan: Plan, group: list[Point]) -> None:
    """Untimed requests after an engine start: every sampling config of the group at its shortest and longest
    prompt length (at least `warmup_requests` requests; none when it is 0)."""
    spec = plan.spec
    if spec.warmup_requests == 0:
        return
    lengths = sorted({p.text_tokens for p in group})
    ends = sorted({lengths[0], lengths[-1]}, reverse=True)
    samplings: dict[str, dict[str, Any]] = {}
    for p in group:
        s = _sampling(spec, p)
        samplings.setdefault(json.dumps(s, sort_keys=True), s)
    combos = [(n, s) for s in samplings.values() for n in ends]
    prompts.reseed(f"warmup:{group[0].engine_config_id}")
    for i in range(max(spec.warmup_requests, len(combos))):
        n, sampling = combos[i % len(combos)]
        engine.run_request(
            f"warmup-{group[0].engine_config_id}-{i}", prompts.cut(n, i).token_ids, spec.max_new_tokens, sampling
        )


@dataclass(frozen=True)
class PlannedRequest:
    """One timed request: its place in the engine start's order (`seq`, 0-based), its point, and `rep`, its index
    within the point (0..reps-1: distinct prompts; then the repeats of one prompt)."""

    seq: int
    point: Point
    rep: int


def request_order(spec: SweepSpec, points: list[Point], key: str) -> list[PlannedRequest]:
    """The order in which one engine start runs its points' requests: seeded by (spec.seed, key), interleaved.

    Requests go in rounds: round r holds one request of every point, in a shuffled order, and each point's own
    requests (distinct prompts and same-prompt repeats) are shuffled over the rounds. So every point spans the
    whole engine start: slow drift (heat, clocks, memory) lands on every length and sampling config alike
    instead of on whichever ran last.
    """
    rng = random.Random(f"{spec.seed}:order:{key}")
    n = spec.requests_per_point
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
        dtype: str,
    ) -> None:
        spec = self.spec = plan.spec
        self.plan, self.source, self.run_id, self.dtype = plan, source, run_id, dtype
        self.order = request_order(spec, points, points[0].engine_config_id)
        self.prompts: dict[str, list[tuple[Prompt, str]]] = {}
        for p in points:  # cut per point as before the interleaving: a resumed run cuts the same prompts
            prompts.reseed(p.point_id)
            plist = [(prompts.cut(p.text_tokens, i), "distinct") for i in range(spec.reps)]
            if spec.same_prompt_repeats:
                same = prompts.cut(p.text_tokens, spec.reps)
                plist += [(same, "same")] * spec.same_prompt_repeats
            self.prompts[p.point_id] = plist
        self.rows: dict[str, list[dict[str, Any]]] = {p.point_id: [] for p in points}
        self.left = {p.point_id: spec.requests_per_point for p in points}
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
                    "text_tokens": rec.prompt_tokens,
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
