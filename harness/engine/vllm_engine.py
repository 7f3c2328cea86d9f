"""A real vLLM engine driven one step at a time, timing every step.

vLLM is imported lazily (inside `VllmEngine.start`) so the package and its `--help` work without it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from contract.manifest import engine_record
from harness.engine.cpu_pinning import CpuPinning, plan_pinning
from harness.engine.reaper import Reaper, descendants, stop_processes
from harness.engine.settings import (
    SERVING_CONTEXT,
    EngineSettings,
    default_token_budget,
)
from harness.engine.steady import Placement, ThreadWatch, place, preload_value, steady_settings

ENGINE_CORE_MODES = {"multiprocess": "1", "inprocess": "0"}
WATCH_INTERVAL_S = 1.0  # how often the watchdog looks at the engine core process
SHUTDOWN_WAIT_S = 5.0  # how long a closed engine's processes may take to end before they are signalled


class EngineError(RuntimeError):
    """The engine could not be built, died, or returned something other than what was asked."""


class MeasurementError(RuntimeError):
    """A request ran but broke a measurement condition (wrong length, cache hit, wrong token count)."""


def _one_line(error: BaseException, limit: int = 300) -> str:
    """An error's whole message on one line, cut to `limit` characters (a pydantic error's first line only
    names the config class; the reason is on the next ones)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _children() -> set[int]:
    """Pids of this process's descendants, minus multiprocessing's resource tracker (shared by later engines)."""
    import psutil

    out = set()
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(p.cmdline()):
                out.add(p.pid)
    return out


@dataclass
class StepRecord:
    """One token's engine step as the caller saw it. Times on the perf_counter clock, in seconds."""

    step_index: int
    t_start_s: float
    t_end_s: float
    latency_ms: float
    step_calls: int
    engine_elapsed_ms: float | None
    client_lagged: bool = False
    prefill_iterations: int = 1  # engine iterations with prompt tokens before the request's first token (0: unknown)
    prefill_chunk: int = 0  # chunked prefill allowed: this prefill row's chunk (the last one emits the token)
    kv_tokens: int | None = None  # a prefill chunk's KV length after it (None: text_tokens + step_index)


@dataclass
class RequestRecord:
    """What one timed request came back with: its steps, and the prompt tokens the engine received (a count the
    engine reports, checked against the request's; not a declaration), cached and generated."""

    steps: list[StepRecord]
    received_tokens: int
    cached_tokens: int
    generated_tokens: int


class _IterationLog:
    """Collects the engine core's own per-iteration times (vLLM SchedulerIterationDetails)."""

    def __init__(self) -> None:
        self.elapsed_ms: list[float] = []
        self.ctx_tokens: list[int] = []  # prompt tokens the iteration scheduled (prefill work), parallel to elapsed_ms
        self.details: list[Any] = []  # the SchedulerIterationDetails themselves, once a driver asks for them
        self.keep_details = False

    def logger_factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        sink = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
            ) -> None:
                details = getattr(scheduler_stats, "iteration_details", None)
                if (
                    details is not None
                    and not details.is_dummy
                    and (details.num_ctx_tokens or details.num_generation_tokens)
                ):
                    sink.elapsed_ms.append(float(details.elapsed_ms))
                    sink.ctx_tokens.append(int(details.num_ctx_tokens or 0))
                    if sink.keep_details:
                        sink.details.append(details)

            def log_engine_initialized(self) -> None:
                pass

        return _Logger


class VllmEngine:
    """One vLLM engine (context manager). `start()` builds it; `run_request()` times one request."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._engine: Any = None
        self._iters = _IterationLog()
        self._watch_stop = threading.Event()
        self.died: str | None = None  # why the engine core process is gone, once the watchdog saw it go
        self.start_seconds: float | None = None
        self.exceptions: list[dict[str, Any]] = []  # set by start(): where the engine departs from serving defaults
        self._pins = CpuPinning(plan_pinning(settings.cpu_pinning, settings.device, settings.mode))
        self._procs: list[int] = []  # the engine's own processes (engine core, workers): stopped by close()
        self.steady = steady_settings()  # ValueError for a malformed setting: the CLI checks it first
        self.placement: Placement | None = None  # where place() put the threads (None: not tried)
        self.preload_notes: list[str] = []
        self.watch = ThreadWatch()  # where each thread ran between watch.begin() and watch.end()
        self._harness_affinity: set[int] | None = None

    def __enter__(self) -> VllmEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> float:
        """Build the engine; return how long that took in seconds."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = ENGINE_CORE_MODES[self.settings.mode]
        # vLLM 0.32 CPU: the AOT compile cache fails to load on the next start ("Compiling model again due to
        # a load failure"), so every start recompiled (~40 s); the older torch.compile cache loads fine.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        if not self.settings.verbose:
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
            os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning")
        before = _children()
        reaper = Reaper.get()  # started before the engine, so it never counts as one of its processes
        t0 = time.perf_counter()
        cpu_multiprocess = self.settings.device == "cpu" and self.settings.mode == "multiprocess"
        if self.settings.device == "cpu" and self.steady.preload:  # the engine's processes load them at exec
            os.environ["LD_PRELOAD"], self.preload_notes = preload_value(self.steady, os.environ.get("LD_PRELOAD", ""))
        with self._pins.spawning():  # vLLM's worker binds its threads to the compute cores
            try:
                from vllm.engine.arg_utils import EngineArgs
                from vllm.v1.engine.llm_engine import LLMEngine

                budget = default_token_budget(self.settings.engine_kwargs)
                self.exceptions = self.settings.exceptions(budget)
                args = EngineArgs(**self.settings.engine_args(budget))
                self._engine = LLMEngine.from_engine_args(
                    args,
                    usage_context=SERVING_CONTEXT(),  # vllm serve's defaults (token budget, max_num_seqs)
                    stat_loggers=[self._iters.logger_factory()],
                    enable_multiprocessing=self.settings.mode == "multiprocess",
                )
            except Exception as e:  # vLLM raises many types; the sweep records them as a failed engine start
                stop_processes(descendants(_children() - before - {reaper.pid}), wait_s=2.0)
                raise EngineError(
                    f"engine start failed for {self.settings.model_name} "
                    f"(block_size={self.settings.block_size}): {type(e).__name__}: "
                    f"{_one_line(e)}"
                ) from e
        self.start_seconds = time.perf_counter() - t0
        self._procs = sorted(_children() - before - {reaper.pid})
        reaper.scan()
        self._watch()
        self._pins.pin(self._engine)
        if cpu_multiprocess and self.steady.place == "reserved" and not self._pins.plan.applied:
            if self.settings.cpu_pinning:
                self._harness_affinity = os.sched_getaffinity(0)
                self.placement = place([os.getpid()])
            else:
                self.placement = Placement(False, "turned off (spec cpu_pinning = false)", [], [])
        return self.start_seconds

    def effective_config(self) -> dict[str, Any]:
        """What the running engine was configured with, read back after start (JSON-ready).

        Read from `LLMEngine.vllm_config`, the caller-side VllmConfig. In multiprocess mode the engine core got a
        copy of it (after the platform's and vLLM's own adjustments, which run here before the core is spawned);
        the values the core settles itself, the KV-cache size (`num_gpu_blocks`) and a block size a backend
        enlarged, are copied back into it from the core's start-up handshake (vLLM 0.32 `core_client.py`).
        """
        cfg = self._vllm_config()
        cache, sched, model, comp = cfg.cache_config, cfg.scheduler_config, cfg.model_config, cfg.compilation_config
        blocks = cache.num_gpu_blocks
        return engine_record(
            "LLMEngine.vllm_config (KV-cache size and block size from the engine core's handshake)",
            {
                "block_size": cache.block_size,
                "num_gpu_blocks": blocks,
                "enable_prefix_caching": cache.enable_prefix_caching,
                "max_num_seqs": sched.max_num_seqs,
                "max_num_batched_tokens": sched.max_num_batched_tokens,
                "enable_chunked_prefill": sched.enable_chunked_prefill,
                "dtype": str(model.dtype).removeprefix("torch."),
                "max_model_len": model.max_model_len,
            },
            kv_cache_tokens=blocks * cache.block_size if blocks else None,
            kv_cache_memory_bytes=cache.kv_cache_memory_bytes,
            async_scheduling=sched.async_scheduling,
            compilation_mode=_plain(comp.mode),
            cudagraph_mode=_plain(comp.cudagraph_mode),
            cudagraph_capture_sizes=list(comp.cudagraph_capture_sizes or []),
            enforce_eager=model.enforce_eager,
            cpu_pinning=self._pins.record(),
            steady={
                **self.steady.record(),
                "placement": self.placement.record() if self.placement else None,
                "preload_notes": self.preload_notes,
                "ld_preload": os.environ.get("LD_PRELOAD", ""),
            },
        )

    def effective_value(self, kind: str, key: str) -> tuple[bool, Any]:
        """(found, value) of an axis target (`kind` "engine" with an EngineArgs field, or "hf" with a config key:
        harness/rundata/spec.py `Target`) in the running engine's config; an EngineArgs field is looked up by name
        on vLLM's sub-configs."""
        cfg = self._vllm_config()
        if kind == "hf":
            hf = cfg.model_config.hf_config
            return (True, getattr(hf, key)) if hasattr(hf, key) else (False, None)
        if kind != "engine":
            return False, None
        for sub in ("cache_config", "scheduler_config", "model_config", "parallel_config", "load_config"):
            obj = getattr(cfg, sub, None)
            if obj is not None and hasattr(obj, key):
                return True, _plain(getattr(obj, key))
        return False, None

    @property
    def dtype(self) -> str:
        """The dtype the running engine computes in ("float32", "bfloat16", ...)."""
        return str(self._vllm_config().model_config.dtype).removeprefix("torch.")

    def dtype_mismatch(self) -> str | None:
        """A message when the running engine's dtype is not the one asked for (the user's engine kwarg, or the
        harness's CPU choice); None when it is, or when nothing was asked (vLLM's "auto")."""
        asked = self.settings.engine_kwargs.get("dtype")
        if asked is None:
            asked = next((e["value"] for e in self.exceptions if e["arg"] == "dtype"), None)
        asked = {"half": "float16", "bf16": "bfloat16", "float": "float32"}.get(str(asked), str(asked))
        if asked in ("None", "auto") or asked == self.dtype:
            return None
        return f"the running engine computes in {self.dtype}, but dtype {asked} was asked for"

    @property
    def llm_engine(self) -> Any:
        """The running vLLM LLMEngine, for a driver that adds requests and steps it itself (drivers/batch.py)."""
        if self._engine is None:
            raise EngineError("engine is not started")
        return self._engine

    def collect_iteration_details(self) -> list[Any]:
        """An emptied list that receives vLLM's SchedulerIterationDetails of every engine iteration with work
        from now on, in order (for harness/drivers/batch.py, which matches them to its own steps)."""
        self._iters.details.clear()
        self._iters.keep_details = True
        return self._iters.details

    def _vllm_config(self) -> Any:
        if self._engine is None:
            raise EngineError("engine is not started")
        return self._engine.vllm_config

    def _watch(self) -> None:
        """Make step() raise, not hang, when the engine core process dies.

        vLLM 0.32's client notices a dead engine core (marks itself dead and shuts down), but a caller blocked
        in step() waits on the client's output queue forever; a watchdog thread puts an error there instead.
        """
        client = getattr(self._engine, "engine_core", None)
        resources = getattr(client, "resources", None)
        outputs = getattr(client, "outputs_queue", None)
        if resources is None or outputs is None:  # in-process engine core: a crash raises in this process
            return
        procs = list(getattr(getattr(resources, "engine_manager", None), "processes", None) or [])
        stop = self._watch_stop = threading.Event()

        def watch() -> None:
            while not stop.wait(WATCH_INTERVAL_S):
                if getattr(resources, "engine_dead", False) or any(not p.is_alive() for p in procs):
                    codes = [p.exitcode for p in procs if p.exitcode is not None]
                    how = [f"killed by {signal.Signals(-c).name}" if c < 0 else f"exit code {c}" for c in codes]
                    self.died = "the engine core process died" + (f" ({', '.join(how)})" if how else "")
                    outputs.put_nowait(RuntimeError(self.died))
                    return

        threading.Thread(target=watch, name="harness-engine-watchdog", daemon=True).start()

    def close(self) -> None:
        """Shut the engine down, and return only when its processes are gone (bounded: SHUTDOWN_WAIT_S, then
        SIGTERM, then SIGKILL)."""
        self._watch_stop.set()
        self._pins.release()
        if self._harness_affinity is not None:  # the harness's own threads back where they were
            from harness.engine.steady import threads

            for tid in threads(os.getpid()):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, self._harness_affinity)
            self._harness_affinity = None
        procs = descendants(self._procs)
        if self._engine is not None:
            # a dying engine must not mask the error that killed it
            with contextlib.suppress(Exception):
                self._engine.engine_core.shutdown()
            self._engine = None
            gc.collect()
        if procs:
            stop_processes(procs, wait_s=SHUTDOWN_WAIT_S)
            self._procs = []

    def run_request(
        self, request_id: str, token_ids: list[int], max_new_tokens: int, sampling: dict[str, Any] | None = None
    ) -> RequestRecord:
        """Run one request alone, timing each engine step; check what the engine did.

        A token's latency is the summed wall time of the `step()` calls since the previous token up to the one
        that returned it (a multiprocess engine may return an empty step first). Garbage collection is off
        while the request runs, so a collection cannot land inside a timed step.
        """
        if self._engine is None:
            raise EngineError("engine is not started")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(**self.settings.sampling_params(max_new_tokens, sampling))
        engine = self._engine
        iters = self._iters.elapsed_ms
        iters.clear()
        self._iters.ctx_tokens.clear()
        # before the first token: each step() call (start, end, iteration-log length), to split a chunked prefill
        prefill_calls: list[tuple[float, float, int]] = []
        pc = time.perf_counter
        # raw: (window start, window end, busy seconds, step calls, tokens so far, iteration-log length)
        raw: list[tuple[float, float, float, int, int, int]] = []
        final: Any = None
        n_prev = 0
        if self.settings.gc_guard:
            # Collect what the last request left, then freeze the survivors (vLLM, torch: ~1 s to scan) so
            # the next collection only scans new objects; no collection can land inside a timed step.
            gc.collect()
            gc.freeze()
            gc.disable()
        try:
            engine.add_request(request_id, TokensPrompt(prompt_token_ids=token_ids), params)
            window_start = -1.0
            busy = 0.0
            calls = 0
            while engine.has_unfinished_requests():
                t0 = pc()
                outs = engine.step()
                t1 = pc()
                if window_start < 0:
                    window_start = t0
                busy += t1 - t0
                calls += 1
                if n_prev == 0:
                    prefill_calls.append((t0, t1, len(iters)))
                if outs:
                    out = outs[0]
                    n = len(out.outputs[0].token_ids)
                    if n != n_prev:
                        raw.append((window_start, t1, busy, calls, n, len(iters)))
                        n_prev = n
                        window_start, busy, calls = -1.0, 0.0, 0
                    if out.finished:
                        final = out
        except Exception as e:
            why = self.died or f"{type(e).__name__}: {_one_line(e)}"
            raise EngineError(f"engine failed during request: {why}") from e
        finally:
            gc.enable()
        self.watch.sample()  # where the processes' main threads are now (between requests: not timed)
        return self._records(raw, final, len(token_ids), max_new_tokens, prefill_calls)

    def _records(
        self,
        raw: list[tuple[float, float, float, int, int, int]],
        final: Any,
        prompt_len: int,
        max_new_tokens: int,
        prefill_calls: list[tuple[float, float, int]],
    ) -> RequestRecord:
        if final is None:
            raise MeasurementError("request did not finish")
        received = len(final.prompt_token_ids or [])
        cached = int(final.num_cached_tokens or 0)
        generated = len(final.outputs[0].token_ids)
        if received != prompt_len:
            raise MeasurementError(f"engine received {received} prompt tokens, {prompt_len} sent")
        if cached != 0:
            raise MeasurementError(f"{cached} prompt tokens came from the prefix cache; expected 0")
        if generated != max_new_tokens:
            raise MeasurementError(f"engine generated {generated} tokens, {max_new_tokens} asked")
        ctx = self._iters.ctx_tokens
        first_iter = raw[0][5] if raw else 0
        prefill_iterations = sum(1 for c in ctx[:first_iter] if c > 0)
        if prefill_iterations > 1 and not self.settings.allow_chunked_prefill:
            raise MeasurementError(
                f"the prefill of {prompt_len} tokens took {prefill_iterations} engine iterations (chunked prefill: "
                "the token budget max_num_batched_tokens is shorter than the prompt); raise the budget, or set "
                "allow_chunked_prefill = true in the spec to record each chunk"
            )
        steps = []
        prev_tokens, prev_iter = 0, 0
        for start, end, busy, calls, tokens, n_iter in raw:
            if tokens != prev_tokens + 1:
                raise MeasurementError(f"one step returned {tokens - prev_tokens} tokens; cannot attribute")
            it = self._iters.elapsed_ms[prev_iter:n_iter]
            if prev_tokens == 0 and prefill_iterations > 1:
                steps += self._prefill_chunks(prefill_calls, prompt_len, prefill_iterations)
                prev_tokens, prev_iter = tokens, n_iter
                continue
            steps.append(
                StepRecord(
                    step_index=prev_tokens,
                    t_start_s=start,
                    t_end_s=end,
                    latency_ms=busy * 1e3,
                    step_calls=calls,
                    engine_elapsed_ms=sum(it) if it else None,
                )
            )
            prev_tokens, prev_iter = tokens, n_iter
        for st in steps:
            st.prefill_iterations = prefill_iterations
        mark_client_lag(steps, self.settings.mode)
        return RequestRecord(steps=steps, received_tokens=received, cached_tokens=cached, generated_tokens=generated)

    def _prefill_chunks(
        self, calls: list[tuple[float, float, int]], prompt_len: int, iterations: int
    ) -> list[StepRecord]:
        """A chunked prefill as one row per chunk: the step() calls up to the one that brought the chunk's
        iteration details (empty calls before it count in its time). Calls that brought two iterations at once
        (the caller fell behind) give one row for both."""
        elapsed, ctx = self._iters.elapsed_ms, self._iters.ctx_tokens
        out: list[StepRecord] = []
        start, busy, n_calls, seen, kv = -1.0, 0.0, 0, 0, 0
        for t0, t1, n_iter in calls:
            start = t0 if start < 0 else start
            busy += t1 - t0
            n_calls += 1
            new = [i for i in range(seen, n_iter) if ctx[i] > 0]
            if not new:
                continue
            kv += sum(ctx[i] for i in new)
            out.append(
                StepRecord(
                    step_index=0,
                    t_start_s=start,
                    t_end_s=t1,
                    latency_ms=busy * 1e3,
                    step_calls=n_calls,
                    engine_elapsed_ms=sum(elapsed[seen:n_iter]),
                    prefill_iterations=iterations,
                    prefill_chunk=len(out),
                    kv_tokens=kv,
                )
            )
            start, busy, n_calls, seen = -1.0, 0.0, 0, n_iter
        if out:
            out[-1].kv_tokens = prompt_len
        return out


def _plain(value: Any) -> Any:
    """A config value as JSON-ready data (enums by name)."""
    import enum

    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


LAG_RATIO = 0.5


def client_lag_marks(latency_ms: list[float], engine_ms: list[float | None], mode: str) -> list[bool]:
    """Which of consecutive steps (or iterations) were split by the harness falling behind the engine core.

    Multiprocess mode: the engine core runs ahead in its own process; if the caller was held up (descheduled on a
    busy machine), the next token is already waiting and its `step()` returns in microseconds, while the step
    before it absorbed the wait. Such a pair is marked: caller time < LAG_RATIO x the engine core's own
    iteration time on the short one (engine_elapsed_ms covers the model's run there, docs/results-schema.md).
    In-process mode nothing is marked: the iteration runs inside the caller's `step()`, so the caller cannot
    fall behind it (a held-up caller makes that step slower, which is measured, not mis-attributed), and
    engine_elapsed_ms covers only the sampling tail there, so the ratio would mean nothing.
    """
    marks = [False] * len(latency_ms)
    if mode == "inprocess":
        return marks
    for i, (lat, eng) in enumerate(zip(latency_ms, engine_ms, strict=True)):
        if eng and lat < LAG_RATIO * eng:
            marks[i] = True
            if i > 0:
                marks[i - 1] = True
    return marks


def mark_client_lag(steps: list[StepRecord], mode: str) -> None:
    """Flag steps where the harness fell behind the engine core (client_lag_marks); the rows stay in the
    results, and the estimator leaves them out."""
    marks = client_lag_marks([s.latency_ms for s in steps], [s.engine_elapsed_ms for s in steps], mode)
    for s, lagged in zip(steps, marks, strict=True):
        s.client_lagged = lagged


def engine_environment() -> dict[str, Any]:
    """vLLM version and build, torch version, the platform vLLM detected, and the CUDA versions (`cuda`: torch's
    build, `cuda_driver`: what the NVIDIA driver supports; None on a CPU box)."""
    from harness.engine.device import cuda_versions

    info: dict[str, Any] = {}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    info.update(cuda_versions())
    try:
        import vllm

        info["vllm"] = getattr(vllm, "__version__", "unknown")
        from vllm.platforms import current_platform

        info["vllm_build"] = "cpu" if current_platform.is_cpu() else str(current_platform.device_type)
    except ImportError as e:
        info["vllm"] = None
        info["vllm_build"] = None
        info["vllm_error"] = str(e)
    return info
