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

from harness.engine.steady import bounded_number

ENV = "LLM_LATENCY_INJECT_SLOWDOWN"


def injected_slowdown(environ: Any = None) -> float:
    """The fraction `ENV` asks for (0.0 when unset or empty); ValueError naming the variable when it is not a
    number in [0, 1]."""
    raw = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not raw:
        return 0.0
    return bounded_number(ENV, raw, 0.0, 1.0, "a fraction of each engine step, e.g. 0.10")


SPIN_S = 0.0002  # the last part of a wait is a yielding spin: a sleep overshoots by ~70 us here


def wait_until(end: float) -> None:
    """Return at `end` (time.perf_counter seconds) without holding the GIL or the core meanwhile: sleep until
    `SPIN_S` before it, then yield (os.sched_yield releases both) until it passes. A plain sleep of 0.1 ms
    overshoots by ~70 us (measured on a Xeon: the kernel's timer slack), which made a 5% slowdown measure as 8-13%;
    a busy spin in Python holds the GIL from the engine core's other threads (its output thread among them), which
    a slower kernel would not. (The study's busy-spin nights, in git history, measured 20% as x1.33-1.40 on three
    nights; with this machine's start-to-start spread that does not tell the spin's cost from noise.)"""
    left = end - time.perf_counter()
    if left > SPIN_S:
        time.sleep(left - SPIN_S)
    while time.perf_counter() < end:
        os.sched_yield()


def slowed(step: Any, fraction: float) -> Any:
    """`step` followed by a wait of `fraction` × the time it took (`wait_until`)."""

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = step(*args, **kwargs)
        t1 = time.perf_counter()
        wait_until(t1 + fraction * (t1 - t0))
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
