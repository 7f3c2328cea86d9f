"""A steady engine on a small CPU (DESIGN.md §14, issue 45): where every thread runs, what the engine's processes
preload, how long vLLM's readers spin; and a record of where each thread ran and how long it waited to run.

On a 2-core machine vLLM's CPU build runs three busy processes (the caller: harness or API server; the engine core;
the worker) and binds only the worker's OpenMP compute thread, to one core. The rest float, onto the compute core
too, and `shm_broadcast`'s readers (engine core and worker) spin on `sched_yield` for 1 s after every message.
`profile experiment stability` measures each setting here as an arm (harness/experiments/stability.py); what it
showed is `defaults()` below. Settings come from the environment, so a sweep, `profile serve-bench` (the API server
and its client), the nightly's sweeps and the experiments' subprocesses all take the same ones:

- `LLM_LATENCY_STEADY=0`: every setting below off: vLLM's own placement, spin and libraries (before issue 45).
- `LLM_LATENCY_PLACE`: `reserved`: after start, every thread but the worker's compute threads on the cores vLLM
  left free (the reserved core); `off`: vLLM's own placement. Acts on where threads run.
- `LLM_LATENCY_READER_SPIN_MS`: how long a `shm_broadcast` reader busy-yields after a message before it sleeps on
  its socket (vLLM: 1000; `vllm` keeps vLLM's). Where threads run: a vLLM general plugin (`register`).
- `LLM_LATENCY_PRELOAD`: `tcmalloc,iomp5` (or a subset, or `none`): the allocator and OpenMP runtime vLLM's CPU
  guide asks for, in the engine's `LD_PRELOAD`. This changes what computes (the OpenMP runtime and allocator).

None of these acts on a CUDA engine except the reader spin (its readers spin there too; measured on CPU only).
`VLLM_USE_SPINLOOP_EXT` and torch's `THP_MEM_ALLOC_ENABLE` are vLLM's and torch's own switches: the study measures
them as arms and the harness leaves them as the user set them.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STEADY_ENV = "LLM_LATENCY_STEADY"
PLACE_ENV = "LLM_LATENCY_PLACE"
SPIN_ENV = "LLM_LATENCY_READER_SPIN_MS"
PRELOAD_ENV = "LLM_LATENCY_PRELOAD"
PLACES = ("reserved", "off")
LIBRARIES = ("tcmalloc", "iomp5")
VLLM_READER_SPIN_MS = 1000.0  # vLLM 0.32 SpinCondition(busy_loop_s=1)


@dataclass(frozen=True)
class Steady:
    """The steady-engine settings of one run. `reader_spin_ms` None: vLLM's own (1000 ms)."""

    place: str  # "reserved" or "off"
    reader_spin_ms: float | None
    preload: tuple[str, ...]  # of LIBRARIES

    def record(self) -> dict[str, Any]:
        """JSON-ready, for the manifest's environment (`steady`), with the libraries' paths as found here."""
        out = asdict(self)
        out["preload"] = list(self.preload)
        out["preload_paths"] = {name: library_path(name) for name in self.preload}
        out["switch"] = f"{STEADY_ENV}=0 turns every setting off"
        return out


OFF = Steady(place="off", reader_spin_ms=None, preload=())


def defaults() -> Steady:
    """What the stability study adopted (docs/stability.md): every thread but the compute thread on the reserved
    core, which took the within-start decode CV from 14.7% to 10.0% on a 2-core AMD EPYC Zen 4. The short reader
    spin made decode x1.51 slower (its readers sleep between 2-ms steps and wake late); the preload and torch's huge
    pages made the level faster but not steadier, and the preload changes what computes."""
    return Steady(place="reserved", reader_spin_ms=None, preload=())


def bounded_number(name: str, raw: str, lo: float, hi: float, what: str) -> float:
    """`raw` (the value of variable `name`) as a number in [lo, hi]; ValueError naming the variable and `what` it
    holds otherwise."""
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number ({what})") from None
    if not lo <= value <= hi:
        raise ValueError(f"{name}={raw!r} is outside [{lo:g}, {hi:g}] ({what})")
    return value


def steady_settings(environ: Mapping[str, str] | None = None) -> Steady:
    """The settings the environment asks for (module table), each unset one at `defaults()`; ValueError naming
    the variable for a malformed value."""
    env = os.environ if environ is None else environ
    steady = env.get(STEADY_ENV, "1").strip()
    if steady not in ("0", "1", ""):
        raise ValueError(f"{STEADY_ENV}={steady!r} must be 0 (off) or 1 (on)")
    base = OFF if steady == "0" else defaults()
    place = env.get(PLACE_ENV, "").strip() or base.place
    if place not in PLACES:
        raise ValueError(f"{PLACE_ENV}={place!r} must be one of {', '.join(PLACES)}")
    spin = base.reader_spin_ms
    raw = env.get(SPIN_ENV, "").strip()
    if raw:
        spin = None if raw == "vllm" else bounded_number(SPIN_ENV, raw, 0.0, 60_000.0, "milliseconds, or 'vllm'")
    preload = base.preload
    raw = env.get(PRELOAD_ENV, "").strip()
    if raw:
        names = () if raw == "none" else tuple(n.strip() for n in raw.split(",") if n.strip())
        bad = [n for n in names if n not in LIBRARIES]
        if bad:
            raise ValueError(f"{PRELOAD_ENV}={raw!r}: unknown {', '.join(bad)} (known: {', '.join(LIBRARIES)}, none)")
        preload = names
    return Steady(place, spin, preload)


def library_path(name: str) -> str | None:
    """Where `name` (tcmalloc or iomp5) is on this machine: iomp5 from the venv's intel-openmp, tcmalloc from the
    system (Debian's libtcmalloc-minimal4, installed by scripts/setup.sh where apt works); None where absent."""
    if name == "iomp5":
        for root in (Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"):
            if (root / "libiomp5.so").is_file():
                return str(root / "libiomp5.so")
        found = ctypes.util.find_library("iomp5")
    else:
        found = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if found and not os.path.isabs(found):
        for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
            if os.path.exists(os.path.join(d, found)):
                return os.path.join(d, found)
    return found


def preload_value(steady: Steady, current: str = "") -> tuple[str, list[str]]:
    """`LD_PRELOAD` with the asked libraries put first (those already in it are kept as they are), and a one-line
    note for each library that is not on this machine (skipped)."""
    parts = [p for p in current.replace(" ", ":").split(":") if p]
    notes, first = [], []
    for name in steady.preload:
        path = library_path(name)
        if path is None:
            notes.append(f"lib{name} not found on this machine: not preloaded")
        elif not any(f"lib{name}" in p for p in parts):
            first.append(path)
    return ":".join(first + parts), notes


# ----- the reader spin: a vLLM general plugin (pyproject entry point), loaded in every vLLM process -----


def register() -> None:
    """vLLM's general-plugin hook: a `shm_broadcast` reader spins `reader_spin_ms`, not 1 s, after each message
    before it sleeps on its notification socket (where the settings ask for it)."""
    try:
        spin = steady_settings().reader_spin_ms
    except ValueError:
        return  # the harness refuses the value before any engine starts; a bare `vllm serve` keeps vLLM's
    if spin is None:
        return
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return
    cls = shm_broadcast.SpinCondition
    init = cls.__init__
    if getattr(init, "__llm_latency_spin__", None) is not None:  # vLLM loads plugins more than once
        return

    def short_spin_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if getattr(self, "is_reader", False):
            self.busy_loop_s = spin / 1e3

    short_spin_init.__llm_latency_spin__ = spin  # type: ignore[attr-defined]
    cls.__init__ = short_spin_init  # type: ignore[method-assign]


# ----- placement: every thread but the compute threads on the reserved cores -----


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def process_tree(roots: Iterable[int]) -> list[int]:
    """`roots` and all their descendant processes alive now (parents first, each once)."""
    seen: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop(0)
        if pid in seen or not os.path.isdir(f"/proc/{pid}"):
            continue
        seen.append(pid)
        todo += _children(pid)
    return seen


def _comm(pid: int, tid: int | None = None) -> str:
    path = f"/proc/{pid}/task/{tid}/comm" if tid is not None else f"/proc/{pid}/comm"
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []


def is_worker(pid: int) -> bool:
    """A vLLM worker process (the one whose OpenMP threads compute): `VLLM::Worker...` by its title."""
    return _comm(pid).startswith("VLLM::Worker")


def compute_threads(pid: int) -> list[int]:
    """A worker's compute threads: its main thread and the threads that carry its title (OpenMP's threads inherit
    it; gloo, ZMQ, jemalloc and torch's helper threads are named otherwise)."""
    main = _comm(pid)
    return [t for t in threads(pid) if t == pid or _comm(pid, t) == main]


@dataclass
class Placement:
    """What `place()` did: the compute CPUs (the worker's own binding, read back), the reserved CPUs the rest went
    to, how many threads moved, or why nothing was (`applied` False)."""

    applied: bool
    reason: str
    compute_cpus: list[int]
    reserved_cpus: list[int]
    threads_moved: int = 0

    def record(self) -> dict[str, Any]:
        return asdict(self)


def place(roots: Iterable[int]) -> Placement:
    """Every thread of the process trees under `roots` onto the cores vLLM's binding left free, except the
    workers' compute threads, which keep their cores. The compute cores are read back from the workers' main
    threads; nothing moves when there is no worker, or no core left over."""
    tree = process_tree(roots)
    workers = [p for p in tree if is_worker(p)]
    if not workers:
        return Placement(False, "no vLLM worker process (in-process engine core, or it is gone)", [], [])
    compute: set[int] = set()
    keep: set[int] = set()
    for w in workers:
        with contextlib.suppress(OSError):
            compute |= os.sched_getaffinity(w)
        keep |= set(compute_threads(w))
    allowed = os.sched_getaffinity(0) | compute
    reserved = allowed - compute
    if not reserved:
        return Placement(False, f"the workers' binding takes every CPU ({sorted(compute)}): none left to reserve",
                         sorted(compute), [])
    moved = 0
    for pid in tree:
        for tid in threads(pid):
            if tid in keep:
                continue
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, reserved)
                moved += 1
    return Placement(True, f"compute threads alone on {sorted(compute)}; every other thread on {sorted(reserved)}",
                     sorted(compute), sorted(reserved), moved)


# ----- where each thread ran and how long it waited: the per-start record -----


def _thread_stats(pid: int, tid: int) -> dict[str, Any] | None:
    base = f"/proc/{pid}/task/{tid}"
    try:
        run_ns, wait_ns, _slices = (int(x) for x in Path(f"{base}/schedstat").read_text().split()[:3])
        stat = Path(f"{base}/stat").read_text()
        status = Path(f"{base}/status").read_text()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    nv = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("nonvoluntary_ctxt")), 0)
    return {"run_ns": run_ns, "wait_ns": wait_ns, "nvcsw": nv, "cpu": int(fields[36])}


def _anon_huge_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def role_of(pid: int, root: int) -> str:
    """`caller` (the harness: the root), `worker`, `engine_core`, `api_server` (vLLM's, under `profile
    serve-bench`), `client` (vLLM's benchmark client there), or `helper` (telemetry sampler, watchdog)."""
    if pid == root:
        return "caller"
    comm = _comm(pid)
    if comm.startswith("VLLM::Worker"):
        return "worker"
    if comm.startswith("VLLM::EngineCor"):
        return "engine_core"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return "helper"
    if "openai.api_server" in cmdline:
        return "api_server"
    if "vllm.benchmarks.serve" in cmdline:
        return "client"
    return "helper"


def cpu_times_ms() -> dict[str, dict[str, float]]:
    """Per CPU, from /proc/stat: busy (user + nice + system + irq + softirq), idle (+ iowait) and steal (the time a
    hypervisor ran something else while this virtual CPU wanted to run), in ms since boot."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[str, dict[str, float]] = {}
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        name, *vals = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        v = [int(x) for x in vals[:8]] + [0] * max(0, 8 - len(vals))
        user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
        out[name] = {"busy_ms": (user + nice + system + irq + softirq) * 1e3 / hz,
                     "idle_ms": (idle + iowait) * 1e3 / hz, "steal_ms": steal * 1e3 / hz}
    return out


class ThreadWatch:
    """Per-thread counters of a process tree between `begin()` and `end()`, and the CPUs its main threads were seen
    on at each `sample()` (call it between timed steps: it reads a few /proc files)."""

    def __init__(self, root: int | None = None) -> None:
        self.root = os.getpid() if root is None else root
        self._before: dict[tuple[int, int], dict[str, Any]] = {}
        self._seen: dict[str, set[int]] = {}
        self._compute_seen: set[int] = set()
        self._cpus_before: dict[str, dict[str, float]] = {}
        self._t0 = 0.0

    def _snapshot(self) -> dict[tuple[int, int], dict[str, Any]]:
        out = {}
        for pid in process_tree([self.root]):
            for tid in threads(pid):
                s = _thread_stats(pid, tid)
                if s is not None:
                    out[(pid, tid)] = s
        return out

    @property
    def begun(self) -> bool:
        return bool(self._before)

    def begin(self) -> None:
        self._cpus_before = cpu_times_ms()
        self._t0 = time.monotonic()
        self._before = self._snapshot()
        self._seen.clear()
        self._compute_seen.clear()

    def sample(self) -> None:
        for pid in process_tree([self.root]):
            s = _thread_stats(pid, pid)
            if s is not None:
                self._seen.setdefault(role_of(pid, self.root), set()).add(s["cpu"])
                if is_worker(pid):
                    self._compute_seen.add(s["cpu"])

    def end(self) -> dict[str, Any]:
        """Per role: run and run-queue wait (ms), involuntary switches, CPUs its main threads were seen on, CPU
        affinity of its main thread, AnonHugePages (kB); and the workers' compute threads on their own."""
        after = self._snapshot()
        before, self._before = self._before, {}
        roles: dict[str, dict[str, Any]] = {}
        compute = {"run_ms": 0.0, "wait_ms": 0.0, "nvcsw": 0, "threads": 0}
        for (pid, tid), a in after.items():
            b = before.get((pid, tid), {"run_ns": 0, "wait_ns": 0, "nvcsw": 0})
            role = role_of(pid, self.root)
            r = roles.setdefault(role, {"run_ms": 0.0, "wait_ms": 0.0, "nvcsw": 0, "threads": 0, "pids": set()})
            d_run, d_wait = (a["run_ns"] - b["run_ns"]) / 1e6, (a["wait_ns"] - b["wait_ns"]) / 1e6
            r["run_ms"] += d_run
            r["wait_ms"] += d_wait
            r["nvcsw"] += a["nvcsw"] - b["nvcsw"]
            r["threads"] += 1
            r["pids"].add(pid)
            if role == "worker" and tid in compute_threads(pid):
                compute["run_ms"] += d_run
                compute["wait_ms"] += d_wait
                compute["nvcsw"] += a["nvcsw"] - b["nvcsw"]
                compute["threads"] += 1
        out: dict[str, Any] = {}
        for role, r in sorted(roles.items()):
            pids = sorted(r.pop("pids"))
            aff: set[int] = set()
            for p in pids:
                with contextlib.suppress(OSError):
                    aff |= os.sched_getaffinity(p)
            huge = [h for h in (_anon_huge_kb(p) for p in pids) if h is not None]
            out[role] = {
                **{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()},
                "cpus_seen": sorted(self._seen.get(role, set())),
                "affinity": sorted(aff),
                "anon_huge_kb": sum(huge) if huge else None,
            }
        out["compute"] = {**{k: round(v, 2) if isinstance(v, float) else v for k, v in compute.items()},
                          "cpus_seen": sorted(self._compute_seen)}
        cpus_after = cpu_times_ms()
        ours = sum(r["run_ms"] for r in roles.values())
        machine = {cpu: {k: round(v - self._cpus_before.get(cpu, {}).get(k, 0.0), 1) for k, v in c.items()}
                   for cpu, c in cpus_after.items()}
        busy = sum(c["busy_ms"] for c in machine.values())
        out["machine"] = {"window_ms": round((time.monotonic() - self._t0) * 1e3, 1), "cpus": machine,
                          "steal_ms": round(sum(c["steal_ms"] for c in machine.values()), 1),
                          # busy time on the machine that none of these processes ran (10 ms ticks)
                          "others_busy_ms": round(max(busy - ours, 0.0), 1)}
        if "worker" not in roles:  # in-process: the caller computes, on torch's own threads
            with contextlib.suppress(ImportError):
                import torch

                out["compute"]["torch_threads"] = torch.get_num_threads()
        return out
