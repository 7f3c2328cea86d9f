"""The steps every driver shares (a sweep, a Ray worker, a replay), each one public and documented.

- `engine_settings`: what an engine start asks of vLLM for one point (the spec's [engine] entries, its
  engine-level axes, the run's options), checked by `EngineSettings` when the engine starts;
- `start_engine`: start it and read back its effective config, with any difference from what the point asked;
- `warm_up`: untimed requests after a start;
- `sampling_of`: a point's sampling parameters;
- `record_engine_start`: one engine start in the run's manifest;
- `environment`: what the run ran on (the commit is the manifest header's: contract/manifest.py);
- `stop_on_signals`: SIGINT/SIGTERM become a flag the loops poll (a second Ctrl-C stops at once).
"""

from __future__ import annotations

import json
import os
import platform
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from harness.drivers.plan import Plan, SweepOptions
from harness.engine.cpu_dtype import AVX2_DECODE_NOTE, machine_dtype_choice
from harness.engine.device import cpu_model
from harness.engine.settings import EngineSettings
from harness.engine.slowdown import injected_slowdown
from harness.engine.steady import steady_settings
from harness.engine.vllm_engine import VllmEngine, engine_environment
from harness.rundata.prompts import PromptSource
from harness.rundata.spec import Point, SweepSpec, engine_axes
from harness.telemetry.sources import nvml_device_count


class StopFlag:
    """SIGINT/SIGTERM set `signal`; a driver stops after the current request (or iteration) and marks the run
    interrupted. A second signal raises KeyboardInterrupt: stop now."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """SIGINT and SIGTERM set the yielded flag instead of killing the process; the old handlers come back on
    exit. Used around a sweep's, a replay's and a Ray driver's loop."""
    flag = StopFlag()
    old = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def engine_settings(plan: Plan, point: Point, options: SweepOptions) -> EngineSettings:
    """What starting an engine for `point` asks of vLLM: its tier's model, the spec's [engine] entries and
    `max_num_seqs`, the point's engine-level axes (`engine:*`, `hf:*`, the block size) and the run's logging.
    EngineSettings adds the checked exceptions to vLLM's serving defaults when the engine starts."""
    spec = plan.spec
    m = plan.models[int(point.axes["tier"])]
    kwargs: dict[str, Any] = dict(spec.engine)
    if spec.max_num_seqs is not None:
        kwargs["max_num_seqs"] = spec.max_num_seqs
    hf: dict[str, Any] = {}
    block_size = None
    for axis in engine_axes(spec):
        target = spec.target(axis)
        value = point.axes[axis]
        if (target.kind, target.key) == ("engine", "block_size"):
            block_size = int(value)
        elif target.kind == "engine":
            kwargs[target.key] = value
        elif target.kind == "hf":
            hf[target.key] = value
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


def sampling_of(spec: SweepSpec, point: Point) -> dict[str, Any]:
    """The point's sampling parameters (its `sampling:*` axes, e.g. {"top_k": 50}), as vLLM's SamplingParams
    names them."""
    return spec.sampling_of(point.axes)


@dataclass
class StartedEngine:
    """An engine start: its duration (s), the running engine's config read back (`effective`), and a message
    naming both values where that config differs from what the point asked for (None when it matches)."""

    seconds: float
    effective: dict[str, Any]
    mismatch: str | None


def start_engine(engine: VllmEngine, spec: SweepSpec, point: Point) -> StartedEngine:
    """Start `engine` (EngineError when it cannot), read back its effective config and check it against `point`.
    The caller records the start before acting on a mismatch, so a refused start is still in the manifest."""
    seconds = engine.start()
    effective = engine.effective_config()
    return StartedEngine(seconds, effective, effective_mismatch(spec, point, engine))


def effective_mismatch(spec: SweepSpec, point: Point, engine: VllmEngine) -> str | None:
    """A message naming both values when the running engine's config differs from an engine-level axis value
    (vLLM or its platform adjusted it: e.g. the CPU platform turns async scheduling off)."""
    dtype = engine.dtype_mismatch()
    if dtype:
        return dtype
    for axis in engine_axes(spec):
        target = spec.target(axis)
        if target.kind == "model":
            continue
        found, value = engine.effective_value(target.kind, target.key)
        if found and value != point.axes[axis]:
            return (
                f"the running engine has {target.key} = {value!r}, but axis {axis} = {point.axes[axis]!r} asked for "
                f"it ({target}); vLLM or its platform changed it"
            )
    return None


def warm_up(engine: VllmEngine, prompts: PromptSource, plan: Plan, group: list[Point]) -> None:
    """Untimed requests after an engine start: every sampling config of the group at its shortest and longest
    prompt length (at least `warmup_requests` requests; none when it is 0)."""
    spec = plan.spec
    if spec.warmup_requests == 0:
        return
    lengths = sorted({p.text_tokens for p in group})
    ends = sorted({lengths[0], lengths[-1]}, reverse=True)
    samplings: dict[str, dict[str, Any]] = {}
    for p in group:
        s = sampling_of(spec, p)
        samplings.setdefault(json.dumps(s, sort_keys=True), s)
    combos = [(n, s) for s in samplings.values() for n in ends]
    prompts.reseed(f"warmup:{group[0].engine_config_id}")
    for i in range(max(spec.warmup_requests, len(combos))):
        n, sampling = combos[i % len(combos)]
        engine.run_request(
            f"warmup-{group[0].engine_config_id}-{i}", prompts.cut(n, i).token_ids, spec.max_new_tokens, sampling
        )


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


def record_engine_threads(store: Any, engine_config_id: str, threads: dict[str, Any]) -> None:
    """Where one engine start's threads ran while it measured (harness/engine/steady.py ThreadWatch), as the
    manifest's `engine_threads` list (one entry per start, in order); a Ray worker's store stand-in skips it."""
    if not hasattr(store, "read_manifest"):
        return
    entries = store.read_manifest().get("engine_threads", [])
    store.update_manifest(engine_threads=[*entries, {"engine_config_id": engine_config_id, **threads}])


def environment(source_info: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """What the run ran on: interpreter, libraries, device; on a CPU, the dtype it computes half precision in and
    why (`cpu_dtype`, harness/engine/cpu_dtype.py)."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        **engine_environment(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "nvml_gpus": nvml_device_count(),
        "device": source_info.get("device_name") or cpu_model(),
        "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "steady": steady_settings().record(),  # harness/engine/steady.py; the placement is per engine start
        "vllm_use_spinloop_ext": os.environ.get("VLLM_USE_SPINLOOP_EXT", "0"),
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
    }
    env["nvml_available"] = env["nvml_gpus"] > 0
    slowdown = injected_slowdown()
    if slowdown:  # the detection study's fake (harness/engine/slowdown.py): estimate nightly refuses such a run
        env["injected_slowdown"] = slowdown
    if device == "cpu":
        choice = machine_dtype_choice()
        env["cpu_dtype"] = choice.as_dict()
        if not choice.native_bf16:  # a known property of this CPU path, not a fault of the run (docs/cpu-dtype.md)
            env["cpu_decode_path"] = AVX2_DECODE_NOTE
    env.update(
        {
            k: v
            for k, v in source_info.items()
            if k in ("driver_version", "uuid", "device_selector", "max_sm_clock_mhz", "power_limit_w")
        }
    )
    return env
