"""The dtype a CPU engine computes in: bfloat16 only where the CPU runs it natively, float32 elsewhere.

A CPU without AVX-512 BF16 or AMX emulates bfloat16: on an AVX2-only AMD EPYC a 1024x256 @ 256x1024 matmul took
14 ms in float32 and 423 ms in bfloat16 (docs/vllm-notes.md), and the presets ask for bfloat16. A person serving vLLM on
such a CPU would pick float32; so does the harness, by evidence:

1. the CPU's flags (`avx512_bf16`, `amx_bf16` in /proc/cpuinfo) and the ISA torch dispatches to
   (`torch.backends.cpu.get_cpu_capability()`, which honours `ATEN_CPU_CAPABILITY`);
2. a short matmul probe in both dtypes, run in a subprocess with this process's environment (so
   `ONEDNN_MAX_CPU_ISA` / `ATEN_CPU_CAPABILITY` count, as they do in the engine's processes), cached per machine.

bfloat16 is kept only when both say it is native: the flags name it, torch dispatches to AVX-512, and the probe's
bfloat16 matmul is no slower than float32 (`NATIVE_MAX_RATIO`). The flags alone can mislead (a restricted oneDNN
ISA, a hypervisor that hides or fakes a flag); the probe is what is measured.

Only the standard library loads at import; the probe imports torch in its own process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
HALF_DTYPES = ("bfloat16", "float16", "half")
# bf16 counts as native when its matmul takes at most this many times float32's (native: 0.1-1x; emulated: ~30x)
NATIVE_MAX_RATIO = 1.5
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA")
PROBE_SHAPE = (1024, 256, 1024)  # (m, k, n): the shape of the measurement

_PROBE = r"""
import json, sys, time
import torch
m, k, n, reps = (int(x) for x in sys.argv[1:5])
torch.set_num_threads(1)
out = {"isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
for dtype in ("float32", "bfloat16"):
    dt = getattr(torch, dtype)
    a, b = torch.randn(m, k).to(dt), torch.randn(k, n).to(dt)
    torch.matmul(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t0)
    out[dtype + "_ms"] = sorted(times)[len(times) // 2] * 1e3
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Probe:
    """One matmul probe: median time of a (m x k) @ (k x n) matmul in each dtype (ms), one thread."""

    isa: str  # torch.backends.cpu.get_cpu_capability() in the probe's process
    torch: str
    float32_ms: float
    bfloat16_ms: float

    @property
    def bf16_slowdown(self) -> float:
        """bfloat16 time over float32 time (about 30 where bf16 is emulated; below 1 with AMX)."""
        return self.bfloat16_ms / self.float32_ms if self.float32_ms > 0 else float("inf")


@dataclass(frozen=True)
class DtypeChoice:
    """What a CPU engine computes in, and why (JSON-ready through `as_dict`)."""

    dtype: str  # "bfloat16" or "float32": what the harness runs a bf16/fp16 model in
    native_bf16: bool
    reason: str
    cpu_flags: tuple[str, ...]  # the native-bf16 flags the CPU reports (empty: none)
    isa_env: dict[str, str]  # ISA-restricting variables in force
    probe: Probe | None  # None: the probe could not run (then the flags decide)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cpu_flags"] = list(self.cpu_flags)
        if self.probe is not None:
            out["probe"]["bf16_slowdown"] = round(self.probe.bf16_slowdown, 2)
        return out


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (the first `flags` line of /proc/cpuinfo); empty where it cannot be read."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> Path:
    """Where per-machine facts are cached: $HARNESS_CACHE_DIR, else $XDG_CACHE_HOME (or ~/.cache)/llm-latency."""
    if os.environ.get("HARNESS_CACHE_DIR"):
        return Path(os.environ["HARNESS_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llm-latency"


def _machine_key(flags: set[str]) -> str:
    """What the probe's answer depends on: CPU model and flags, Python and torch install, ISA variables."""
    from harness.engine.device import cpu_model

    parts = [cpu_model(), " ".join(sorted(flags)), sys.executable, _torch_version()]
    parts += [f"{k}={os.environ.get(k, '')}" for k in ISA_ENV]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _torch_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "none"


def run_probe(reps: int = 7, timeout_s: float = 120.0) -> Probe | None:
    """Time the probe matmul in float32 and bfloat16 in a fresh interpreter (this environment); None when torch
    is missing or the probe fails."""
    m, k, n = PROBE_SHAPE
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, str(m), str(k), str(n), str(reps)],
            capture_output=True, text=True, timeout=timeout_s, check=True,
        )
        data = json.loads(done.stdout.strip().splitlines()[-1])
        return Probe(str(data["isa"]), str(data["torch"]), float(data["float32_ms"]), float(data["bfloat16_ms"]))
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None


def cached_probe(flags: set[str]) -> Probe | None:
    """The probe for this machine: read from the cache, or run once and cached (an unwritable cache is skipped)."""
    path = cache_dir() / f"dtype-probe-{_machine_key(flags)}.json"
    try:
        data = json.loads(path.read_text())
        return Probe(**data)
    except (OSError, ValueError, TypeError):
        pass
    probe = run_probe()
    if probe is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(asdict(probe)))
            os.replace(tmp, path)
        except OSError:
            pass
    return probe


def choose_cpu_dtype(flags: set[str] | None = None, probe: Probe | None | bool = True) -> DtypeChoice:
    """Decide what a CPU engine computes a bfloat16/float16 model in. `flags`: the CPU's flags (default: this
    machine's); `probe`: a Probe, None (no probe: the flags decide), or True (this machine's, cached)."""
    flags = cpu_flags() if flags is None else flags
    found = tuple(f for f in NATIVE_BF16_FLAGS if f in flags)
    isa_env = {k: os.environ[k] for k in ISA_ENV if os.environ.get(k)}
    measured = cached_probe(flags) if probe is True else (probe or None)
    if not found:
        why = (
            f"the CPU reports no native bfloat16 ({' / '.join(NATIVE_BF16_FLAGS)} absent), so bfloat16 is emulated"
        )
        native = False
    elif measured is None:
        why, native = f"the CPU reports {', '.join(found)} (no probe could run to confirm it)", True
    elif not measured.isa.upper().startswith("AVX512"):
        why = f"the CPU reports {', '.join(found)}, but torch dispatches to {measured.isa}"
        native = False
    elif measured.bf16_slowdown > NATIVE_MAX_RATIO:
        why = f"the CPU reports {', '.join(found)}, but bfloat16 is not native here"
        native = False
    else:
        why, native = f"the CPU reports {', '.join(found)} and torch dispatches to {measured.isa}", True
    if measured is not None:
        why += (
            f"; probe: a {'x'.join(map(str, PROBE_SHAPE[:2]))} @ {'x'.join(map(str, PROBE_SHAPE[1:]))} matmul took "
            f"{measured.float32_ms:.1f} ms in float32 and {measured.bfloat16_ms:.1f} ms in bfloat16 "
            f"({measured.bf16_slowdown:.1f}x)"
        )
    if isa_env:
        why += "; " + ", ".join(f"{k}={v}" for k, v in isa_env.items())
    dtype = "bfloat16" if native else "float32"
    reason = (
        f"bfloat16 kept: it is native on this CPU ({why})"
        if native
        else f"float32 instead of the model's half precision: {why}"
    )
    return DtypeChoice(dtype, native, reason, found, isa_env, measured)


def model_dtype(config: dict[str, Any]) -> str:
    """The dtype a model's config.json asks for (`torch_dtype`, or `dtype` in newer configs); float32 if none."""
    value = config.get("torch_dtype") or config.get("dtype") or "float32"
    return str(value).removeprefix("torch.")


def emulation_warning(asked: str, choice: DtypeChoice) -> str | None:
    """A warning for an asked-for dtype that this CPU emulates (None when it is native or not half precision)."""
    if str(asked).removeprefix("torch.") not in HALF_DTYPES or choice.native_bf16:
        return None
    slow = ""
    if choice.probe is not None:
        slow = f" (the probe measured its matmul {choice.probe.bf16_slowdown:.1f}x slower than float32)"
    return f"dtype {asked} is emulated on this CPU{slow}: prefill will be far slower than a server here would pick"


_choice: DtypeChoice | None = None


def machine_dtype_choice() -> DtypeChoice:
    """`choose_cpu_dtype()` for this machine, decided once per process (the probe itself is cached on disk)."""
    global _choice
    if _choice is None:
        _choice = choose_cpu_dtype()
    return _choice


# What a profile of one decode iteration showed on an AVX2-only CPU (AMD EPYC, 2 cores, cpu-tiny, float32; torch
# profiler, in-process engine core, docs/cpu-dtype.md): about 3.6 ms of CPU work per iteration, spread over ~90 small
# ops rather than concentrated in one slow kernel: oneDNN matmuls 32% (17 calls, ~70 us each at M=1), the
# attention and KV-cache custom ops with their Python wrappers 28%, the compiled graph's own Python 18%, sampling 7%.
# Per-call dispatch cost, on the one compute thread vLLM leaves on 2 cores, not FLOPs (0.01 GFLOP). No setting
# fixed it: two compute threads (VLLM_CPU_OMP_THREADS_BIND=0-1) slowed decode 1.6x, preloading libiomp5 changed
# nothing beyond run-to-run noise.
AVX2_DECODE_NOTE = (
    "known property: a decode step costs ~5 ms on cpu-tiny on an AVX2-only 2-core CPU (1.3 ms on AVX-512): "
    "per-op dispatch overhead on vLLM's single compute thread, not FLOPs; no engine setting removes it "
    "(docs/cpu-dtype.md)"
)
