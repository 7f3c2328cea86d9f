"""CPU pinning: the harness, the engine core's process and the engine's compute threads on separate cores.

On a CPU box the harness (which times every step), vLLM's engine-core process (scheduler and I/O) and the worker's
OpenMP compute threads otherwise share cores: vLLM's automatic binding (`VLLM_CPU_OMP_THREADS_BIND=auto`) puts one
compute thread on every core but one and leaves the harness and the engine core to float. With pinning:

- the harness's threads run on one core (the last physical core of the first NUMA node),
- the engine core's process on another (the one before it),
- the compute threads on the rest, one thread per core (`VLLM_CPU_OMP_THREADS_BIND` = those cores, which also
  sets the engine's thread count: vLLM gives it OMP_NUM_THREADS = their number).

**Rule**: only in multiprocess mode (in-process the engine core *is* the harness's process), only on the CPU build,
only when the user has not set `VLLM_CPU_OMP_THREADS_BIND`, and only with at least MIN_PHYSICAL_CORES physical
cores (at least two compute cores left); otherwise vLLM's own binding stands. The engine then runs one compute
thread fewer than vLLM's default (which reserves one core, not two): `engine_threads` and `vllm_default_threads`
are both recorded (manifest `engine_starts[].effective.cpu_pinning`). Whether it lowers the noise is measured by
`scripts/bench_harness.py noise` (variant "cpu pinning off"); spec `cpu_pinning = false` turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIN_PHYSICAL_CORES = 4
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
_CPU_SYS = Path("/sys/devices/system/cpu")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def physical_cores(allowed: set[int] | None = None, sys_cpu: Path = _CPU_SYS) -> list[list[int]]:
    """The allowed logical CPUs of the first NUMA node (the lowest allowed CPU's, as vLLM's auto binding takes
    rank 0's), grouped by physical core (SMT siblings together), in CPU order."""
    cpus = sorted(allowed if allowed is not None else os.sched_getaffinity(0))
    if not cpus:
        return []

    def node(c: int) -> str:
        nodes = sorted(p.name for p in (sys_cpu / f"cpu{c}").glob("node[0-9]*"))
        return nodes[0] if nodes else "node0"

    first = node(cpus[0])
    cores: dict[tuple[str, str], list[int]] = {}
    for c in cpus:
        if node(c) != first:
            continue
        topo = sys_cpu / f"cpu{c}" / "topology"
        key = (_read(topo / "physical_package_id") or "0", _read(topo / "core_id") or f"cpu{c}")
        cores.setdefault(key, []).append(c)
    return sorted(cores.values(), key=lambda cs: cs[0])


@dataclass
class PinPlan:
    """Which CPUs each part gets (logical CPU ids), or why nothing is pinned (`applied` False)."""

    applied: bool
    reason: str
    harness_cpus: list[int] = field(default_factory=list)
    engine_core_cpus: list[int] = field(default_factory=list)
    worker_cpus: list[int] = field(default_factory=list)  # one compute thread each
    vllm_default_threads: int | None = None  # what vLLM's auto binding would run (one per core but one)

    def record(self) -> dict[str, Any]:
        """JSON-ready, for the manifest."""
        return {
            "applied": self.applied,
            "reason": self.reason,
            "rule": f"multiprocess CPU engine, {BIND_ENV} unset, >= {MIN_PHYSICAL_CORES} physical cores",
            "harness_cpus": self.harness_cpus,
            "engine_core_cpus": self.engine_core_cpus,
            "worker_cpus": self.worker_cpus,
            "engine_threads": len(self.worker_cpus) if self.applied else None,
            "vllm_default_threads": self.vllm_default_threads,
        }


def plan_pinning(
    wanted: bool, device: str, mode: str, env: dict[str, str] | None = None, cores: list[list[int]] | None = None
) -> PinPlan:
    """The pinning for one engine start under the module's rule."""
    env = dict(os.environ) if env is None else env
    if not wanted:
        return PinPlan(False, "turned off (spec cpu_pinning = false)")
    if device != "cpu":
        return PinPlan(False, f"device {device}: pinning is for the CPU engine")
    if mode != "multiprocess":
        return PinPlan(False, "in-process engine core: it runs in the harness's own process")
    if env.get(BIND_ENV, "auto") != "auto":
        return PinPlan(False, f"{BIND_ENV}={env[BIND_ENV]} set by the user: vLLM binds as told")
    cores = physical_cores() if cores is None else cores
    if len(cores) < MIN_PHYSICAL_CORES:
        return PinPlan(
            False,
            f"{len(cores)} physical core(s) (< {MIN_PHYSICAL_CORES}): vLLM's own binding kept",
            vllm_default_threads=max(len(cores) - 1, 1),
        )
    return PinPlan(
        True,
        f"{len(cores)} physical cores: harness, engine core and compute threads on separate cores",
        harness_cpus=list(cores[-1]),
        engine_core_cpus=list(cores[-2]),
        worker_cpus=[cs[0] for cs in cores[:-2]],  # one logical CPU per physical core, as vLLM's auto binding
        vllm_default_threads=len(cores) - 1,
    )


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def _pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of process `pid` onto `cpus` (sched_setaffinity acts on one thread)."""
    for tid in _threads(pid):
        with suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cpus)


def engine_core_pids(llm_engine: Any) -> list[int]:
    """The engine-core process ids of a multiprocess vLLM LLMEngine (vLLM 0.32: engine_core.resources.
    engine_manager.processes); [] in-process."""
    resources = getattr(getattr(llm_engine, "engine_core", None), "resources", None)
    procs = getattr(getattr(resources, "engine_manager", None), "processes", None) or []
    return [p.pid for p in procs if getattr(p, "pid", None)]


class CpuPinning:
    """Applies a PinPlan around one engine start: `spawning()` (a context: the compute cores for vLLM's worker,
    and the harness on every core of its original set, so that the processes it spawns start with all of them),
    `pin(llm_engine)` (the engine core's process and the harness onto their cores), `release()` (the harness back
    to its original cores)."""

    def __init__(self, plan: PinPlan) -> None:
        self.plan = plan
        self._original: set[int] | None = None

    @contextmanager
    def spawning(self) -> Iterator[None]:
        if not self.plan.applied:
            yield
            return
        self.release()
        before = os.environ.get(BIND_ENV)
        os.environ[BIND_ENV] = ",".join(map(str, self.plan.worker_cpus))
        try:
            yield
        finally:  # only the engine's spawn needs it; a failed start must not leave it for the next plan
            if before is None:
                os.environ.pop(BIND_ENV, None)
            else:
                os.environ[BIND_ENV] = before

    def pin(self, llm_engine: Any) -> None:
        if not self.plan.applied:
            return
        self._original = os.sched_getaffinity(0)
        for pid in engine_core_pids(llm_engine):
            _pin_process(pid, set(self.plan.engine_core_cpus))
        _pin_process(os.getpid(), set(self.plan.harness_cpus))

    def release(self) -> None:
        if self._original is not None:
            _pin_process(os.getpid(), self._original)
            self._original = None

    def record(self) -> dict[str, Any]:
        return self.plan.record()
