"""Batch points of a sweep: the `batch` axis (B sequences decoding together from a prompt of `text_tokens`) and
`batch_join_tokens` (P > 0: a new prompt of P tokens joins once the batch has returned half its tokens, so a
prefill shares iterations with the decodes). Driven by harness/drivers/batch.py; the sweep only dispatches here.

One episode = B requests added at once (distinct prompts, `max_new_tokens` each) plus the joiner (P tokens,
`max_new_tokens - max_new_tokens // 2` new tokens). A point runs `reps` episodes (distinct prompts each; the
spec's same-prompt repeats do not apply), in a seeded order interleaved with the other points of the engine
start. Its rows go to iterations/<point_id>.parquet (segment_id = point_id) and requests/<point_id>.parquet,
written when its last episode is done.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from contract.request import Request
from harness.drivers.batch import Drive, InFlight, iterations_frame, requests_frame
from harness.engine.vllm_engine import EngineError, MeasurementError, VllmEngine
from harness.rundata.prompts import Prompt, PromptSource
from harness.rundata.spec import Point, SpecError, SweepSpec
from harness.rundata.store import RunStore
from harness.telemetry.sampler import TelemetrySampler
from harness.telemetry.sources import TelemetrySource, telemetry_frame

BATCH_AXES = ("batch", "batch_join_tokens")


def is_batch_spec(spec: SweepSpec) -> bool:
    return "batch" in spec.axes


def check_batch_spec(spec: SweepSpec, context: int, prompt_tokens: int | None = None) -> None:
    """Refuse batch axis values that cannot run: sizes < 1, negative join lengths, a joiner longer than the
    context or than the prompt text (`prompt_tokens`, when known)."""
    for name, target in spec.mapping.items():
        if target == "batch" and name not in BATCH_AXES:
            raise SpecError(f"axis '{name}' maps to 'batch', which only {' and '.join(BATCH_AXES)} can")
    if "batch_join_tokens" in spec.axes and "batch" not in spec.axes:
        raise SpecError("axis batch_join_tokens needs the batch axis")
    for b in spec.axes.get("batch", []):
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise SpecError(f"batch must be positive integers (sequences decoding together), got {b!r}")
    for p in spec.axes.get("batch_join_tokens", []):
        if not isinstance(p, int) or isinstance(p, bool) or p < 0:
            raise SpecError(f"batch_join_tokens must be integers >= 0 (0 = no joiner), got {p!r}")
        if p + spec.max_new_tokens > context:
            raise SpecError(f"batch_join_tokens {p} + max_new_tokens {spec.max_new_tokens} exceeds the context "
                            f"({context} tokens)")
        if prompt_tokens is not None and p > prompt_tokens:
            raise SpecError(f"prompt text too short: at most {prompt_tokens} tokens, batch_join_tokens {p} requested")


def _shape(point: Point) -> tuple[int, int]:
    return int(point.axes["batch"]), int(point.axes.get("batch_join_tokens", 0))


def episode_requests(spec: SweepSpec, point: Point, prompts: list[Prompt], rep: int,
                     sampling: dict[str, Any]) -> list[InFlight]:
    """One episode's requests: B at once, then the joiner (if any) after half the tokens."""
    b, join = _shape(point)
    n = spec.max_new_tokens
    reqs = [InFlight(Request.make(f"{point.point_id}-{rep}-{i}", 0.0, len(prompts[i].token_ids), n),
                     prompts[i].token_ids, prompts[i].prompt_id, 0.0, sampling=sampling) for i in range(b)]
    if join:
        j = prompts[b]
        reqs.append(InFlight(Request.make(f"{point.point_id}-{rep}-join", 0.0, len(j.token_ids), n - n // 2),
                             j.token_ids, j.prompt_id, None, after_tokens=n // 2, sampling=sampling))
    return reqs


@dataclass
class BatchOutcome:
    """How a batch pass ended: `done` (every point written or failed), `interrupted`, `fail_fast`, or `restart`
    (the engine failed: start a new one for the points left); `failed` counts the points that failed."""

    status: str
    failed: int


class BatchPass:
    """One engine start's batch points: prompts, a seeded interleaved episode order, rows until written."""

    def __init__(self, engine: VllmEngine, spec: SweepSpec, points: list[Point], prompts: PromptSource,
                 source: TelemetrySource, store: RunStore, common: Callable[[Point], dict[str, Any]],
                 sampling: Callable[[Point], dict[str, Any]]) -> None:
        self.engine, self.spec, self.points, self.source, self.store = engine, spec, points, source, store
        self.common, self.sampling = common, sampling
        self.prompts: dict[str, list[list[Prompt]]] = {}
        for p in points:
            b, join = _shape(p)
            prompts.reseed(f"batch:{p.point_id}")
            self.prompts[p.point_id] = [
                [prompts.cut(p.text_tokens, r * b + i) for i in range(b)]
                + ([prompts.cut(join, spec.reps * b + r)] if join else [])
                for r in range(spec.reps)
            ]
        rng = random.Random(f"{spec.seed}:batch-order:{points[0].engine_config_id}")
        self.order: list[tuple[Point, int]] = []
        for r in range(spec.reps):
            round_ = [(p, r) for p in points]
            rng.shuffle(round_)
            self.order += round_
        self.iterations: dict[str, list[dict[str, Any]]] = {p.point_id: [] for p in points}
        self.requests: dict[str, list[dict[str, Any]]] = {p.point_id: [] for p in points}
        self.telemetry: list[dict[str, Any]] = []

    def warm_up(self) -> None:
        """One untimed episode of the largest batch at the shortest length (batched shapes compile here)."""
        p = max(self.points, key=lambda q: (_shape(q)[0], -q.text_tokens))
        reqs = episode_requests(self.spec, p, self.prompts[p.point_id][0], 0, self.sampling(p))
        for r in reqs:
            r.request = r.request.declaring(request_id=f"warmup-{r.request_id}")
            r.request = r.request.generating(min(r.request.output_tokens, 2))
            r.after_tokens = 1 if r.after_tokens is not None else None
        Drive(self.engine, reqs).run()

    def run(self, stop: Callable[[], bool], fail: Callable[[Point, Exception], None], fail_fast: bool,
            written: Callable[[Point, dict[str, Any]], None]) -> BatchOutcome:
        """Run every episode; write a point when its last episode is done. Removes each point, written or failed,
        from `self.points`."""
        found, max_seqs = self.engine.effective_value("engine", "max_num_seqs")
        failed = 0
        for p in list(self.points):
            b, join = _shape(p)
            if found and b + (1 if join else 0) > int(max_seqs):
                self._drop(p, fail, MeasurementError(f"batch {b}{' + 1 joiner' if join else ''} needs max_num_seqs "
                                                     f">= {b + (1 if join else 0)}; the engine has {max_seqs}"))
                failed += 1
                if fail_fast:
                    return BatchOutcome("fail_fast", failed)
        sampler = TelemetrySampler(self.source, self.spec.telemetry_interval_ms, self.spec.telemetry_mode)
        with sampler if self.spec.telemetry else contextlib.nullcontext():
            for point, rep in self.order:
                if stop():
                    return BatchOutcome("interrupted", failed)
                if point not in self.points:
                    continue
                reqs = episode_requests(self.spec, point, self.prompts[point.point_id][rep], rep, self.sampling(point))
                offset = len(self.iterations[point.point_id])
                try:
                    drive = Drive(self.engine, reqs, stop, iteration_offset=offset).run()
                except (EngineError, MeasurementError) as e:
                    if stop():
                        return BatchOutcome("interrupted", failed)
                    self._drop(point, fail, e)
                    failed += 1
                    if fail_fast:
                        return BatchOutcome("fail_fast", failed)
                    if isinstance(e, EngineError):
                        return BatchOutcome("restart", failed)
                    continue
                if drive.stopped:
                    return BatchOutcome("interrupted", failed)
                self.telemetry += sampler.drain()
                common = {**self.common(point), "rep": rep}
                self.iterations[point.point_id] += drive.iteration_rows(common)
                self.requests[point.point_id] += drive.request_rows(common)
                if rep == self.spec.reps - 1:  # rounds: every point's last episode is in the last round
                    figures = self._write(point)
                    self.points.remove(point)
                    written(point, figures)
        return BatchOutcome("done", failed)

    def _drop(self, point: Point, fail: Callable[[Point, Exception], None], error: Exception) -> None:
        self.points.remove(point)
        fail(point, error)

    def _write(self, point: Point) -> dict[str, Any]:
        pid = point.point_id
        tel = telemetry_frame(self.telemetry, self.source.name)
        iterations = iterations_frame(self.iterations.pop(pid), tel)
        requests = requests_frame(self.requests.pop(pid))
        seen: dict[str, Prompt] = {q.prompt_id: q for ep in self.prompts[pid] for q in ep}
        prompt_rows = [{"prompt_id": q.prompt_id, "text": q.text, "text_tokens": q.text_tokens,
                        "token_ids": q.token_ids, "source": q.source, "content_class": q.content_class,
                        "prompt_kind": "distinct", "point_id": pid} for q in seen.values()]
        tables = {"prompts": pa.Table.from_pylist(prompt_rows),
                  "requests": pa.Table.from_pandas(requests, preserve_index=False),
                  "iterations": pa.Table.from_pandas(iterations, preserve_index=False)}
        if not tel.empty:
            tables["telemetry"] = pa.Table.from_pandas(tel.assign(point_id=pid), preserve_index=False)
        self.telemetry = []
        self.store.write_point(pid, tables)
        return _figures(iterations)


def _figures(iterations: pd.DataFrame) -> dict[str, float]:
    """Headline figures for the progress line (named as the sweep's: prefill = iterations with a prefill)."""
    pre = iterations.loc[iterations.num_prefill_seqs > 0, "latency_ms"]
    dec = iterations.loc[iterations.num_prefill_seqs == 0, "latency_ms"]
    return {"prefill_ms": float(pre.median()) if len(pre) else float("nan"),
            "decode_ms": float(dec.median()) if len(dec) else float("nan")}


def run_batch_group(
    engine: VllmEngine,
    spec: SweepSpec,
    remaining: list[Point],
    prompts: PromptSource,
    source: TelemetrySource,
    store: RunStore,
    *,
    model: str,
    device: str,
    done: set[str],
    total: int,
    stop: Callable[[], bool],
    fail: Callable[[Point, Exception], None],
    fail_fast: bool,
    report: Callable[[str, dict[str, Any]], None],
) -> BatchOutcome:
    """The sweep's entry: run the batch points left in `remaining` on a started engine (removing each one as it is
    written or fails), adding written points to `done`."""
    found, max_seqs = engine.effective_value("engine", "max_num_seqs")

    def common(point: Point) -> dict[str, Any]:
        return {"run_id": store.run_dir.name, "segment_id": point.point_id, "kind": "batch",
                "engine_config_id": point.engine_config_id, **point.axes, "model": model,
                "max_new_tokens": spec.max_new_tokens, "max_num_seqs": max_seqs if found else None,
                "engine_mode": spec.engine_mode, "dtype": engine.dtype, "device": device}

    def sampling(point: Point) -> dict[str, Any]:
        return spec.sampling_of(point.axes)

    def written(point: Point, figures: dict[str, Any]) -> None:
        done.add(point.point_id)
        store.update_manifest(points_done=len(done))
        report("point", {"point": point, "done": len(done), "total": total, **figures})

    batch = BatchPass(engine, spec, remaining, prompts, source, store, common, sampling)
    report("log", {"message": f"measuring {len(batch.order)} batch episodes of {len(remaining)} points in one "
                              "interleaved order"})
    try:
        if not stop():
            batch.warm_up()
    except (EngineError, MeasurementError) as e:
        if stop():
            return BatchOutcome("interrupted", 0)
        n = len(remaining)
        for p in list(remaining):
            batch._drop(p, fail, e)
        return BatchOutcome("fail_fast" if fail_fast else "done", n)
    return batch.run(stop, fail, fail_fast, written)
