"""`profile replay`: a workload of timed requests on one real engine, one row per engine iteration.

Each request is added when its arrival time has passed (harness clock, relative to the segment's start) and the
engine is stepped until all have finished (harness/drivers/batch.py). A run is made of segments: the first replays the
whole workload; `--resume` replays the requests that had not finished, keeping their relative arrival offsets,
in a new segment on a new engine. Files are rewritten atomically at checkpoints (when the engine is idle before a
later arrival, every `flush_every` finished requests, at a stop and at the end): a kill loses at most the
requests finished since the last checkpoint, and they run again on resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from contract.policy import ArrivalPolicy, PolicyError
from contract.request import Request
from harness.drivers.batch import Drive, InFlight, iterations_frame, requests_frame
from harness.drivers.plan import Plan, SweepOptions, plan_sweep, prompt_sources
from harness.drivers.session import (
    engine_settings,
    environment,
    sampling_of,
    start_engine,
    stop_on_signals,
    warm_up,
)
from harness.engine.device import cpu_model
from harness.engine.log import LOG_NAME, EngineOutput
from harness.engine.vllm_engine import EngineError, MeasurementError, VllmEngine
from harness.rundata.prompts import Prompt, PromptSource
from harness.rundata.spec import ServingSpec, SpecError, SweepSpec, build_spec
from harness.rundata.store import RunStore, StoreError, check_writable, utc_now
from harness.rundata.workload import check_context, parse_workload, write_workload
from harness.telemetry.sampler import TelemetrySampler
from harness.telemetry.sources import nvml_device_count, open_source, telemetry_frame

WORKLOAD_NAME = "workload.jsonl"
KIND = "replay"

Reporter = Callable[[str, dict[str, Any]], None]


@dataclass
class ReplayOptions:
    out_root: Path = Path("results")
    resume_dir: Path | None = None
    run_id: str | None = None
    flush_every: int = 16
    verbose: bool = False
    engine_output: EngineOutput | None = None
    source: dict[str, Any] = field(default_factory=dict)  # where the workload came from (file or generator)
    command: list[str] = field(default_factory=lambda: list(sys.argv))
    policy: ArrivalPolicy | None = None  # decides each request's priority (or rejects it) at arrival
    solo: bool = False  # each request alone: sent when the engine is idle (an oracle's latencies)


@dataclass
class ReplayResult:
    run_dir: Path
    status: str
    requests_total: int
    requests_done: int
    segment_id: str | None
    iterations: int
    error: str | None = None


def replay_spec(serving: ServingSpec, workload: list[Request]) -> SweepSpec:
    """The one-point sweep spec a replay of `workload` plans with (ServingSpec.for_workload: `text_tokens` = its
    longest prompt, which the token budget must hold)."""
    if not workload:
        raise SpecError("the workload has no requests")
    return serving.for_workload(max(r.text_tokens for r in workload))


def plan_replay(
    spec: SweepSpec, workload: list[Request], where: str
) -> tuple[Plan, list[Prompt], PromptSource]:
    """Check the workload against the model and cut every request's prompt, before any engine starts.

    Prompts without text are cut from the corpus in a seeded order, the same on every resume."""
    plan = plan_sweep(spec)
    model = plan.models[int(spec.axes["tier"][0])]
    check_context(workload, model.max_context, where)
    source = prompt_sources(plan)[model.path]
    source.reseed("replay")
    prompts = []
    for r in workload:
        if r.prompt is None:
            prompts.append(source.cut(r.text_tokens, r.index))
            continue
        ids = source.tokenizer.encode(r.prompt)
        if len(ids) < r.text_tokens:
            raise SpecError(
                f"{where} line {r.index + 1}: prompt has {len(ids)} tokens with {source.tokenizer.name}, "
                f"text_tokens {r.text_tokens} asked"
            )
        ids = ids[: r.text_tokens]
        bad = [i for i in ids if not 0 <= i < model.vocab_size]
        if bad:
            raise SpecError(f"{where} line {r.index + 1}: token id {bad[0]} >= the model's vocab_size")
        digest = hashlib.sha1(f"{source.tokenizer.name}|{ids}".encode()).hexdigest()[:12]
        prompts.append(Prompt(f"p-{digest}", source.tokenizer.decode(ids), ids, f"workload line {r.index + 1}", "user"))
    return plan, prompts, source


def finished_ids(store: RunStore) -> set[str]:
    table = store.read_table("requests")
    return set(table.column("request_id").to_pylist()) if table is not None else set()


def resume_plan(workload: list[Request], done: set[str]) -> tuple[list[Request], float]:
    """The requests still to run and the workload time at which the new segment starts (its first unfinished
    arrival; each request then arrives at its original offset from it)."""
    todo = [r for r in workload if r.request_id not in done]
    return todo, (todo[0].arrival_s if todo else 0.0)


def run_replay(serving: ServingSpec | None, workload: list[Request] | None, options: ReplayOptions,
               report: Reporter) -> ReplayResult:
    """Run a workload on the engine config `serving` (or, with options.resume_dir, the unfinished rest of a replay
    run). The manifest keeps `serving` as given and, as `spec`, the one-point grid the shared planner runs it as.
    Bad input fails with SpecError/StoreError before a run folder is written or an engine started."""
    spec = replay_spec(serving, workload) if serving is not None and workload is not None else None
    if options.resume_dir is not None:
        store = RunStore.open(options.resume_dir)
        manifest = store.read_manifest()
        if manifest.get("kind") != KIND:
            raise SpecError(f"{options.resume_dir} is not a replay run (resume sweeps with profile sweep --resume)")
        where = f"workload {store.run_dir / WORKLOAD_NAME}"
        try:
            workload = parse_workload((store.run_dir / WORKLOAD_NAME).read_text(encoding="utf-8"), where)
        except OSError as e:
            raise StoreError(f"cannot read {store.run_dir / WORKLOAD_NAME}: {e.strerror or e}") from None
        spec = build_spec(manifest["spec"])
        plan, prompts, cutter = plan_replay(spec, workload, where)
        for p in store.discard_partial():
            report("log", {"message": f"discarded unfinished write {p.relative_to(store.run_dir)}"})
        todo, base = resume_plan(workload, finished_ids(store))
        store.update_manifest(status="running", resumed_at=utc_now(), resume_command=options.command)
    else:
        assert spec is not None and workload is not None
        plan, prompts, cutter = plan_replay(spec, workload, "workload")
        todo, base = workload, 0.0
        check_writable(options.out_root)
        store = None
    with open_source(0 if spec.device == "cuda" else None) as source:  # GPU: its NVML counters
        if store is None:
            store = RunStore.new(
                KIND, options, spec, environment(source.info, spec.device),
                serving=serving.model_dump(mode="json") if serving is not None else None,
                replay={"workload": WORKLOAD_NAME, "source": options.source, "flush_every": options.flush_every},
                telemetry={
                    "source": source.name,
                    "reason": f"{source.reason}; NVML sees {nvml_device_count()} GPU(s)",
                    "interval_ms": spec.telemetry_interval_ms,
                },
                engine_mode=spec.engine_mode,
                requests_total=len(workload),
                requests_done=0,
                segments=[],
                engine_starts=[],
                models={str(t): m.__dict__ for t, m in plan.models.items()},
            )
            write_workload(store.run_dir / WORKLOAD_NAME, workload)
        if not todo:
            store.update_manifest(status="complete", ended_at=utc_now())
            return ReplayResult(store.run_dir, "complete", len(workload), len(workload), None, 0)
        if options.engine_output is not None:
            options.engine_output.attach(store.run_dir / LOG_NAME)
        segment = _Segment(plan, store, prompts, cutter, todo, base, options, source, report)
        with stop_on_signals() as stop:
            try:
                status, error = segment.run(lambda: stop.signal is not None)
            except KeyboardInterrupt:  # a second Ctrl-C
                status, error = "interrupted", None
    done = len(finished_ids(store))
    if status == "complete" and done < len(workload):
        status = "failed"
    store.update_manifest(status=status, ended_at=utc_now(), requests_done=done)
    n_iter = len(segment.drive.iterations) if segment.drive else 0
    return ReplayResult(store.run_dir, status, len(workload), done, segment.segment_id, n_iter, error)


class _Segment:
    """One engine start replaying `todo` (arrival offsets from `base`), writing its tables at checkpoints."""

    def __init__(self, plan: Plan, store: RunStore, prompts: list[Prompt], cutter: PromptSource,
                 todo: list[Request], base: float, options: ReplayOptions, source: Any,
                 report: Reporter) -> None:
        self.plan, self.store, self.prompts, self.todo, self.base = plan, store, prompts, todo, base
        self.cutter = cutter
        self.options, self.source, self.report = options, source, report
        self.segment_id = f"seg-{len(store.read_manifest().get('segments', [])):03d}"
        self.drive: Drive | None = None
        self.telemetry: list[dict[str, Any]] = []
        self.sampler: TelemetrySampler | None = None
        self.common: dict[str, Any] = {}

    def run(self, stop: Callable[[], bool]) -> tuple[str, str | None]:
        plan, spec, store = self.plan, self.plan.spec, self.store
        point = plan.points[0]
        settings = engine_settings(plan, point, SweepOptions(verbose=self.options.verbose,
                                                              engine_output=self.options.engine_output))
        engine = VllmEngine(settings)
        try:
            try:
                started = start_engine(engine, spec, point)
                seconds, effective = started.seconds, started.effective
                manifest = store.read_manifest()
                store.update_manifest(
                    engine_starts=[*manifest.get("engine_starts", []), {
                        "segment_id": self.segment_id, "model": settings.model_name, "seconds": round(seconds, 2),
                        "effective": effective}],
                    segments=[*manifest.get("segments", []), {
                        "segment_id": self.segment_id, "started_at": utc_now(), "requests": len(self.todo),
                        "workload_start_s": self.base}],
                )
                if started.mismatch:
                    raise MeasurementError(started.mismatch)
                self.report("log", {"message": f"engine start {settings.model_name}: {seconds:.1f} s; replaying "
                                               f"{len(self.todo)} requests as segment {self.segment_id}"})
                if not stop():
                    warm_up(engine, self.cutter, plan, [point])
            except (EngineError, MeasurementError) as e:
                return self._failed(e, stop)
            model = plan.models[int(point.axes["tier"])].name
            self.common = {
                "run_id": store.run_dir.name, "segment_id": self.segment_id, "kind": KIND, "rep": 0,
                **{a: v for a, v in point.axes.items() if a != "text_tokens"}, "model": model,
                "max_num_seqs": effective.get("max_num_seqs"), "engine_mode": spec.engine_mode,
                "dtype": engine.dtype, "device": self.source.info.get("device_name") or cpu_model(),
            }
            sampling = sampling_of(spec, point)
            requests = [
                InFlight(r, self.prompts[r.index].token_ids, self.prompts[r.index].prompt_id,
                         start_s=r.arrival_s - self.base, sampling=sampling, workload_clock=True)
                for r in self.todo
            ]
            if self.options.policy is not None:
                try:
                    self.options.policy.start(effective, {a: v for a, v in point.axes.items() if a != "text_tokens"})
                except Exception as e:  # e.g. a model not trained on this config
                    return self._failed(PolicyError(f"policy {self.options.policy.name}: {e}"), stop)
            self.drive = Drive(engine, requests, stop, self._checkpoint, self.options.flush_every,
                               policy=self.options.policy, solo=self.options.solo)
            self.sampler = TelemetrySampler(self.source, spec.telemetry_interval_ms, spec.telemetry_mode)
            try:
                with self.sampler if spec.telemetry else contextlib.nullcontext():
                    self.drive.run()
            except (EngineError, MeasurementError, PolicyError) as e:
                self._checkpoint(self.drive)
                return self._failed(e, stop)
            self._checkpoint(self.drive)
            return ("interrupted" if self.drive.stopped else "complete"), None
        finally:
            engine.close()

    def _failed(self, error: Exception, stop: Callable[[], bool]) -> tuple[str, str | None]:
        if stop():  # Ctrl-C in a terminal reaches the engine core too: not a failure
            return "interrupted", None
        message = f"{type(error).__name__}: {error}"
        self.store.record_failure({"segment_id": self.segment_id, "error_type": type(error).__name__,
                                   "error": str(error)})
        self.report("log", {"message": f"[failed] segment {self.segment_id}: {message}"})
        return "failed", message

    def _checkpoint(self, drive: Drive) -> None:
        """Rewrite the segment's files with everything so far; requests last (they say what is finished)."""
        if self.sampler is not None:
            self.telemetry += self.sampler.drain()
        tel = telemetry_frame(self.telemetry, self.source.name)
        finished = drive.request_rows(self.common)
        by_id = {r.request_id: self.prompts[r.index] for r in self.todo}
        prompt_rows = [
            {"prompt_id": p.prompt_id, "text": p.text, "text_tokens": p.text_tokens, "token_ids": p.token_ids,
             "source": p.source, "content_class": p.content_class, "prompt_kind": "distinct",
             "point_id": self.segment_id}
            for p in {by_id[r["request_id"]].prompt_id: by_id[r["request_id"]] for r in finished}.values()
        ]
        tables: dict[str, pa.Table] = {}
        if prompt_rows:
            tables["prompts"] = pa.Table.from_pylist(prompt_rows)
        if not tel.empty:
            tables["telemetry"] = pa.Table.from_pandas(tel.assign(point_id=self.segment_id), preserve_index=False)
        iterations = iterations_frame(drive.iteration_rows(self.common), tel)
        if not iterations.empty:
            tables["iterations"] = pa.Table.from_pandas(iterations, preserve_index=False)
        if finished:
            tables["requests"] = pa.Table.from_pandas(requests_frame(finished), preserve_index=False)
        self.store.write_point(self.segment_id, tables, order=("prompts", "telemetry", "iterations", "requests"))
        self.store.update_manifest(requests_done=len(finished_ids(self.store)))
        self.report("progress", {"segment_id": self.segment_id, "finished": len(finished), "todo": len(self.todo),
                                 "iterations": len(drive.iterations)})


def summary(run_dir: Path) -> pd.DataFrame:
    """Per segment: requests, iterations, median and p90 TTFT and end-to-end time (ms), mean batch size."""
    store = RunStore(run_dir)
    req = store.read_table("requests")
    its = store.read_table("iterations")
    if req is None or its is None:
        return pd.DataFrame()
    r, i = req.to_pandas(), its.to_pandas()
    rows = []
    for seg, g in r.groupby("segment_id"):
        it = i[i.segment_id == seg]
        rows.append({
            "segment": seg, "requests": len(g), "iterations": len(it),
            "ttft_p50_ms": round(float(g.ttft_ms.median()), 2), "ttft_p90_ms": round(float(g.ttft_ms.quantile(0.9)), 2),
            "e2e_p50_ms": round(float(g.e2e_ms.median()), 2), "mean_batch": round(float(it.batch_size.mean()), 2),
            "iter_p50_ms": round(float(it.latency_ms.median()), 2),
            "mismatches": int(it.composition_mismatch.sum()),
        })
    return pd.DataFrame(rows)
