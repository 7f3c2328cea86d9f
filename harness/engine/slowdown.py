"""The injected slowdown: the one fake in this project, for the nightly's detection study (issue 35, docs/nightly.md).

A vLLM general plugin (entry point group `vllm.general_plugins`, registered in pyproject.toml) that vLLM loads in
every process it starts, the engine-core process included (`EngineCore.__init__` calls `load_general_plugins()`
before it binds its step function). With `LLM_LATENCY_INJECT_SLOWDOWN=F` set (a fraction, 0 < F ≤ 1), it wraps
`EngineCore.step` and `EngineCore.step_with_batch_queue` so that each engine step, after it has run, waits F × its
own duration before its outputs leave the engine core: every step, prefill and decode, takes (1 + F) × as long.
Unset or empty, the plugin changes nothing.

The harness records the fraction in the run manifest (`environment.injected_slowdown`), and `estimate nightly`
refuses a run that carries one: only `estimate experiment nightly-detection` measures with it.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

ENV = "LLM_LATENCY_INJECT_SLOWDOWN"


def injected_slowdown(environ: Any = None) -> float:
    """The fraction `ENV` asks for (0.0 when unset or empty); ValueError naming the variable when it is not a
    number in [0, 1]."""
    raw = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r} is not a number (a fraction of each engine step, e.g. 0.10)") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{ENV}={raw!r} is outside [0, 1] (a fraction of each engine step, e.g. 0.10)")
    return value


def slowed(step: Any, fraction: float) -> Any:
    """`step` followed by a wait of `fraction` × the time it took. The wait spins on the clock instead of sleeping:
    a CPU decode step here takes ~2 ms, and a sleep of 0.1 ms overshoots by ~70 us (measured on the Xeon: the
    kernel's timer slack), which made a 5% slowdown measure as 13% in the study's first nights; the spin ends within
    a microsecond and, like a slower kernel, holds the engine core's thread."""

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = step(*args, **kwargs)
        t1 = time.perf_counter()
        end = t1 + fraction * (t1 - t0)
        while time.perf_counter() < end:
            pass
        return out

    wrapper.__llm_latency_slowdown__ = fraction  # type: ignore[attr-defined]
    return wrapper


def register() -> None:
    """vLLM's general-plugin hook: patch the engine core's step functions when `ENV` asks for a slowdown."""
    fraction = injected_slowdown()
    if fraction <= 0:
        return
    from vllm.v1.engine.core import EngineCore

    for name in ("step", "step_with_batch_queue"):
        fn = getattr(EngineCore, name, None)
        if fn is not None and not hasattr(fn, "__llm_latency_slowdown__"):  # vLLM loads plugins more than once
            setattr(EngineCore, name, slowed(fn, fraction))
