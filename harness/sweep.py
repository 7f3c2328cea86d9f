"""The sweep: plan the grid, run each point on a real engine, and store what was measured.

The CLI builds a `SweepSpec` and `SweepOptions` and calls `run_sweep`; the same works from Python.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from harness import __version__
from harness.batch_points import check_batch_spec, is_batch_spec, run_batch_group
from harness.engine import (
    EngineError,
    EngineSettings,
    MeasurementError,
    RequestRecord,
    VllmEngine,
    engine_environment,
)
from harness.engine_log import LOG_NAME, EngineOutput
from harness.prompts import Prompt, PromptSource, load_documents, load_tokenizer
from harness.spec import (
    Point,
    SpecError,
    SweepSpec,
    build_spec,
    engine_axes,
    expand,
    group_by_engine,
    model_config,
    resolve_model,
)
from harness.store import RunStore, check_writable, utc_now
from harness.telemetry import (
    TelemetrySampler,
    TelemetrySource,
    join_snapshots,
    lock_clocks,
    nvml_device_count,
    open_source,
    telemetry_frame,
)

# Rough throughput used only by --dry-run's duration estimate (FLOP/s of useful model work, and fixed costs).
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


@dataclass
class SweepResult:
    run_dir: Path
    status: str
    points_done: int
    points_failed: int
    summary: pd.DataFrame
    figures: dict[str, Any]


def _param_count(cfg: dict[str, Any]) -> int:
    h = int(cfg.get("hidden_size", 0))
    layers = int(cfg.get("num_hidden_layers", 0))
    heads = int(cfg.get("num_attention_heads", 1))
    kv = int(cfg.get("num_key_value_heads", heads))
    hd = int(cfg.get("head_dim", h // max(heads, 1)))
    inter = int(cfg.get("intermediate_size", 4 * h))
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter
    return layers * per_layer + int(cfg.get("vocab_size", 0)) * h


def plan_sweep(spec: SweepSpec) -> Plan:
    """Expand the grid and check every point against its model before anything is measured."""
    models: dict[int, TierModel] = {}
    for tier in spec.axes["tier"]:
        name, path = resolve_model(spec.ladder[tier])
        cfg = model_config(path)
        if "architectures" not in cfg:
            raise SpecError(f"{path}/config.json has no 'architectures' entry")
        ctx = int(cfg.get("max_position_embeddings", 2048))
        models[tier] = TierModel(tier, name, path, int(cfg.get("vocab_size", 0)), ctx, _param_count(cfg))
    longest = max(spec.axes["text_tokens"])
    for m in models.values():
        if longest + spec.max_new_tokens > m.max_context:
            raise SpecError(
                f"text_tokens {longest} + max_new_tokens {spec.max_new_tokens} exceeds the context "
                f"of tier {m.tier} ({m.name}: {m.max_context} tokens)"
            )
    check_batch_spec(spec, min(m.max_context for m in models.values()))
    points = expand(spec)
    return Plan(spec, points, group_by_engine(points), models)


def prompt_sources(plan: Plan) -> dict[str, PromptSource]:
    """One prompt cutter per model path, checked before any engine starts.

    Raises SpecError when the prompt text is too short for the longest `text_tokens` (with that model's
    tokenizer) or the tokenizer gives ids outside the model's vocabulary.
    """
    documents = load_documents(plan.spec.prompts)
    longest = max(plan.spec.axes["text_tokens"])
    where = f"prompts file {plan.spec.prompts}" if plan.spec.prompts else "the built-in corpus"
    sources: dict[str, PromptSource] = {}
    for m in plan.models.values():
        if m.path in sources:
            continue
        source = PromptSource(documents, load_tokenizer(m.path), m.vocab_size, plan.spec.seed)
        if source.max_tokens < longest:
            raise SpecError(
                f"prompt text too short: {where} gives at most {source.max_tokens} tokens with "
                f"{source.tokenizer.name} (tier {m.tier}), text_tokens {longest} requested"
            )
        sources[m.path] = source
    return sources


def _git_info() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
        )
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(source_info: dict[str, Any]) -> dict[str, Any]:
    """What the run ran on: interpreter, libraries, device."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        **engine_environment(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "nvml_gpus": nvml_device_count(),
        "device": source_info.get("device_name") or cpu_model(),
        "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
    }
    env["nvml_available"] = env["nvml_gpus"] > 0
    env.update(
        {
            k: v
            for k, v in source_info.items()
            if k in ("driver_version", "uuid", "device_selector", "max_sm_clock_mhz", "power_limit_w")
        }
    )
    return env


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the sweep stops after the current request and marks the run interrupted."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum


@contextmanager
def _stop_on_signals() -> Iterator[_StopFlag]:
    flag = _StopFlag()
    old = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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
        allow_chunked_prefill=spec.allow_chunked_prefill,
    )


def _sampling(spec: SweepSpec, point: Point) -> dict[str, Any]:
    return {
        spec.mapping[a].split(":", 1)[1]: v for a, v in point.axes.items() if spec.mapping[a].startswith("sampling:")
    }


Reporter = Callable[[str, dict[str, Any]], None]


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
        if options.resume_dir is not None:
            store = RunStore.open(options.resume_dir)
            for p in store.discard_partial():
                report("log", {"message": f"discarded unfinished write {p.relative_to(store.run_dir)}"})
            manifest = store.update_manifest(status="running", resumed_at=utc_now(), resume_command=options.command)
            if build_spec(manifest.get("spec") or {}) != spec:
                raise SpecError(
                    f"--resume: the run in {options.resume_dir} was made with another spec; resume it "
                    "with the same flags (or none: the saved spec is used)"
                )
        else:
            commit, dirty = _git_info()
            store = RunStore.create(
                options.out_root,
                {
                    "tool_version": __version__,
                    "git_commit": commit,
                    "git_dirty": dirty,
                    "command": options.command,
                    "spec": spec.model_dump(mode="json"),
                    "environment": environment(source.info),
                    "telemetry": {
                        "source": source.name,
                        "reason": source.reason
                        if source.name == "nvml"
                        else f"{source.reason}; NVML sees {nvml_device_count()} GPU(s), so host counters stand in",
                        "interval_ms": spec.telemetry_interval_ms,
                        "power_field": source.info.get("power_field"),
                        "clocks_locked_mhz": options.lock_clocks_mhz,
                    },
                    "engine_mode": spec.engine_mode,
                    "started_at": utc_now(),
                    "ended_at": None,
                    "status": "running",
                    "points_total": len(plan.points),
                    "points_done": 0,
                    "points_failed": 0,
                    "engine_starts": [],
                    "models": {str(t): m.__dict__ for t, m in plan.models.items()},
                },
                run_id=options.run_id,
            )
        if options.engine_output is not None:
            options.engine_output.attach(store.run_dir / LOG_NAME)
        with lock_clocks(source, options.lock_clocks_mhz), _stop_on_signals() as stop:
            try:
                status = _run_points(plan, store, options, source, sources, stop, report)
            except KeyboardInterrupt:  # a second Ctrl-C: the engine is already closed, the point not written
                status = "interrupted"
    return _finish(store, plan, status, report)


def _run_points(
    plan: Plan,
    store: RunStore,
    options: SweepOptions,
    source: TelemetrySource,
    sources: dict[str, PromptSource],
    stop: _StopFlag,
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
    spec = plan.spec
    failed = 0  # in this attempt; a resumed run retries earlier failures
    for group in todo_groups:
        first = group[0]
        settings = _engine_settings(plan, first, options)
        m = plan.models[int(first.axes["tier"])]
        prompts = sources[m.path]
        remaining = list(group)
        while remaining:  # one pass per engine start; an engine that dies is restarted for the rest
            engine = VllmEngine(settings)
            try:  # the engine is closed however this pass ends (failure, Ctrl-C, a second Ctrl-C)
                try:
                    log = options.engine_output
                    log_offset = log.offset() if log else 0
                    seconds = engine.start()
                    warnings, errors = log.levels_since(log_offset) if log else (0, 0)
                    effective = engine.effective_config()
                    starts = store.read_manifest().get("engine_starts", [])
                    store.update_manifest(
                        engine_defaults="vLLM's for `vllm serve` (UsageContext.OPENAI_API_SERVER) on this model "
                        "and device, except engine_exceptions and the spec's own [engine] entries and axes",
                        engine_exceptions=engine.exceptions,
                        engine_starts=[
                            *starts,
                            {
                                "engine_config_id": first.engine_config_id,
                                "model": m.name,
                                "block_size": effective["block_size"],
                                "seconds": round(seconds, 2),
                                "log_warnings": warnings,
                                "log_errors": errors,
                                "effective": effective,
                            },
                        ],
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
                        return "interrupted"
                    for p in remaining:
                        _fail(store, p, e, report)
                    failed += len(remaining)
                    store.update_manifest(points_failed=failed)
                    if options.fail_fast:
                        return "failed"
                    break
                if is_batch_spec(spec):  # several requests in flight (harness/batch_points.py)
                    outcome = run_batch_group(
                        engine, spec, remaining, prompts, source, store, model=m.name,
                        device=source.info.get("device_name") or cpu_model(), done=done, total=len(plan.points),
                        stop=lambda: stop.signal is not None, fail=lambda p, e: _fail(store, p, e, report),
                        fail_fast=options.fail_fast, report=report,
                    )
                    failed += outcome.failed
                    store.update_manifest(points_failed=failed)
                    if outcome.status in ("interrupted", "fail_fast"):
                        return "interrupted" if outcome.status == "interrupted" else "failed"
                    continue  # done, or an engine restart for the points left
                # every request of this engine start in one seeded, interleaved order; a point is written once
                # all its requests are done (so a kill or Ctrl-C loses only unfinished points)
                batch = _EnginePass(plan, remaining, prompts, source, store.run_dir.name)
                report(
                    "log",
                    {
                        "message": f"measuring {len(batch.order)} requests of {len(remaining)} points in one "
                        "interleaved order (points are written as their last request finishes)"
                    },
                )
                sampler = TelemetrySampler(source, spec.telemetry_interval_ms)
                with sampler if spec.telemetry else contextlib.nullcontext():
                    for req in batch.order:
                        point = req.point
                        if stop.signal is not None:
                            return "interrupted"
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
                                return "interrupted"
                            remaining.remove(point)
                            batch.drop(point)
                            _fail(store, point, e, report)
                            failed += 1
                            store.update_manifest(points_failed=failed)
                            if options.fail_fast:
                                return "failed"
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
                        store.update_manifest(points_done=len(done), points_failed=failed)
                        report("point", {"point": point, "done": len(done), "total": len(plan.points), **figures})
            finally:
                engine.close()
    return "complete" if failed == 0 else "failed"


def _effective_mismatch(spec: SweepSpec, point: Point, engine: VllmEngine) -> str | None:
    """A message naming both values when the running engine's config differs from an engine-level axis value
    (vLLM or its platform adjusted it: e.g. the CPU platform turns async scheduling off)."""
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
        self, plan: Plan, points: list[Point], prompts: PromptSource, source: TelemetrySource, run_id: str
    ) -> None:
        spec = self.spec = plan.spec
        self.plan, self.source, self.run_id = plan, source, run_id
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


def _finish(store: RunStore, plan: Plan, status: str, report: Reporter) -> SweepResult:
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
    """Caller step time over the engine core's own iteration time, per phase (median ratio)."""
    out: dict[str, Any] = {"rows": len(samples)}
    if samples.empty or "engine_elapsed_ms" not in samples:
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
