"""Telemetry beside the sweep: GPU counters through NVML, or host counters through psutil.

Samples are dicts on the harness's clock (`t_s`, seconds of `time.perf_counter()`), with `source` and the
counters of that source (None where a read failed or the device does not support it; `error` says why).
Column names carry units; "MB" is MiB (2**20 bytes), as nvidia-smi shows it.

Only the standard library and pynvml load at import, so this module works in a bare torch environment
(scripts/gpu_telemetry_check.py); psutil, numpy and pandas load when first used.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

try:
    import pynvml
except ImportError:  # nvidia-ml-py is a core dependency, but a host-only run must not need it
    pynvml = None

from harness.telemetry.tables import (  # re-exported: the tables of samples live there
    COLUMNS,
    HOST_COLUMNS,
    MIN_COUNTER_WINDOW_S,
    NVML_COLUMNS,
    THROTTLE_IGNORED_BITS,
    join_snapshots,
    telemetry_frame,
)

__all__ = ["COLUMNS", "HOST_COLUMNS", "MIN_COUNTER_WINDOW_S", "NVML_COLUMNS", "THROTTLE_IGNORED_BITS",
           "join_snapshots", "telemetry_frame"]

log = logging.getLogger(__name__)

_MIB = 1024 * 1024

# NVML clock-event ("throttle") reason bits; the values are part of the NVML ABI.
THROTTLE_REASON_NAMES: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",  # older ClocksThrottleReason bits
    0x400: "reliability",
}


class TelemetryError(Exception):
    """Telemetry cannot be set up or read; the message is one line, shown to the user as is."""


class NotSupportedError(TelemetryError):
    """The device does not support this counter or operation."""


class NoPermissionError(TelemetryError):
    """The operation needs root/admin rights."""


def _translate(exc: Exception) -> TelemetryError:
    """Map a pynvml.NVMLError to the project's exception: the one place NVML errors are translated."""
    message = f"NVML: {exc}"
    if isinstance(exc, pynvml.NVMLError_NotSupported | pynvml.NVMLError_FunctionNotFound):  # driver lacks it
        return NotSupportedError(message)
    if isinstance(exc, pynvml.NVMLError_NoPermission):
        return NoPermissionError(message)
    return TelemetryError(message)


def _nvml(fn: Callable[..., Any], *args: Any) -> Any:
    """Call one pynvml function; NVML errors come out as TelemetryError."""
    try:
        return fn(*args)
    except pynvml.NVMLError as exc:
        raise _translate(exc) from exc


def nvml_cuda_driver_version() -> str | None:
    """The driver's CUDA version as "major.minor" (nvmlSystemGetCudaDriverVersion); None without NVML."""
    nvml = pynvml
    if nvml is None:
        return None
    try:
        _nvml(nvml.nvmlInit)
    except TelemetryError:
        return None
    try:
        v = int(_nvml(nvml.nvmlSystemGetCudaDriverVersion))
        return f"{v // 1000}.{v % 1000 // 10}"
    except (TelemetryError, TypeError, ValueError):
        return None
    finally:
        with suppress(TelemetryError):
            _nvml(nvml.nvmlShutdown)


def decode_throttle_reasons(mask: int | None) -> list[str]:
    """Names of the clock-event reason bits set in `mask` (unknown bits as hex); [] for None or 0."""
    if not mask:
        return []
    names = [name for bit, name in THROTTLE_REASON_NAMES.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASON_NAMES)
    if unknown:
        names.append(hex(unknown))
    return names


Reader = Callable[[], tuple[Any, ...]]


class TelemetrySource:
    """Where samples come from. `read()` returns one sample without `t_s`; errors never escape it.

    A counter whose reader raises NotSupportedError is None from then on and not read again (`unsupported`);
    any other failure makes that counter None in this sample only and is named in the sample's `error`.
    One thread reads at a time (a sampler, or `watch`).
    """

    name: str = ""

    def __init__(self, reason: str, info: dict[str, Any], readers: Sequence[tuple[tuple[str, ...], Reader]]):
        self.reason = reason
        self.info = info
        self._readers = list(readers)
        self._skip = [False] * len(self._readers)

    @property
    def columns(self) -> list[str]:
        """Counter names this source produces, in order."""
        return list(COLUMNS[self.name])

    @property
    def unsupported(self) -> list[str]:
        """Counters found unsupported so far (None in every sample)."""
        return [n for (names, _), skip in zip(self._readers, self._skip, strict=True) if skip for n in names]

    def sampler_spec(self) -> dict[str, Any]:
        """How a sampler process opens the same source (harness/telemetry/sampler.py); a source that cannot be reopened
        elsewhere raises TelemetryError, and is sampled in a thread instead."""
        raise TelemetryError(f"telemetry source {self.name!r} cannot be sampled in a process of its own")

    def read(self) -> dict[str, Any]:
        """One sample: `source`, every counter (None when not read), and `error` when a read failed."""
        sample: dict[str, Any] = {"source": self.name}
        errors: list[str] = []
        for i, (names, reader) in enumerate(self._readers):
            values: tuple[Any, ...] | None = None
            if not self._skip[i]:
                try:
                    values = reader()
                except NotSupportedError:
                    self._skip[i] = True
                except Exception as exc:  # one failing counter must not stop the others
                    errors.append(f"{names[0]}: {exc}")
            if values is None:
                for name in names:
                    sample[name] = None
            else:
                for name, value in zip(names, values, strict=True):
                    sample[name] = value
        if errors:
            sample["error"] = "; ".join(errors)
        return sample


# --- host ---------------------------------------------------------------------------------------------------


class HostSource(TelemetrySource):
    """CPU frequency and utilization, load average, and resident memory of this process and its children.

    `rss_mb` sums this process and its descendants (e.g. vLLM's engine-core process); the list of children is
    refreshed every `children_refresh_s` seconds, not every sample, to keep reads cheap.
    `cpu_util_pct` is system-wide since the reading thread's previous sample (None on a thread's first one).
    """

    name = "host"

    def __init__(self, reason: str, children_refresh_s: float = 1.0, pid: int | None = None):
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process(pid)  # whose memory (with its children's) rss_mb sums: this process by default
        self._children: list[Any] = []
        self._children_read_at = -math.inf
        self._children_refresh_s = children_refresh_s
        self._primed_threads: set[int] = set()
        info = {"cpu_count": os.cpu_count(), "pid": self._proc.pid}
        super().__init__(
            reason,
            info,
            [
                (("cpu_freq_mhz",), self._cpu_freq),
                (("cpu_util_pct",), self._cpu_util),
                (("rss_mb",), self._rss),
                (("load_avg_1m",), self._load),
            ],
        )

    def _cpu_freq(self) -> tuple[float]:
        try:
            freq = self._psutil.cpu_freq()
        except (AttributeError, NotImplementedError, OSError) as exc:
            raise NotSupportedError(f"cpu_freq: {exc}") from exc
        if freq is None:
            raise NotSupportedError("cpu_freq: not available here")
        return (float(freq.current),)

    def _cpu_util(self) -> tuple[float | None]:
        # psutil keeps the previous CPU times per thread; a thread's first call has nothing to compare with.
        tid = threading.get_ident()
        value = self._psutil.cpu_percent(interval=None)
        if tid not in self._primed_threads:
            self._primed_threads.add(tid)
            return (None,)
        return (float(value),)

    def _rss(self) -> tuple[float]:
        now = time.perf_counter()
        if now - self._children_read_at >= self._children_refresh_s:
            me = os.getpid()  # a sampler process of the harness does not count itself
            self._children = [c for c in self._proc.children(recursive=True) if c.pid != me]
            self._children_read_at = now
        total = self._proc.memory_info().rss
        for child in self._children:
            try:
                total += child.memory_info().rss
            except self._psutil.Error:  # the child ended: list the children again next time
                self._children_read_at = -math.inf
        return (total / _MIB,)

    def _load(self) -> tuple[float]:
        return (os.getloadavg()[0],)

    def sampler_spec(self) -> dict[str, Any]:
        """How a sampler process opens the same source (harness/telemetry/sampler.py)."""
        return {"kind": "host", "pid": self._proc.pid}


# --- NVML ---------------------------------------------------------------------------------------------------


def _field_value(field: Any) -> float | int:
    """The number in an NVML field value (c_nvmlFieldValue_t), read by its value type."""
    if field.nvmlReturn != pynvml.NVML_SUCCESS:
        raise _translate(pynvml.NVMLError(field.nvmlReturn))
    attr = {
        pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
        pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
        pynvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
    }.get(field.valueType, "usVal")
    value: float | int = getattr(field.value, attr)
    return value


class NvmlSource(TelemetrySource):
    """GPU counters of one NVML device handle (NVML must be initialized while it is used)."""

    name = "nvml"

    def __init__(self, handle: Any, reason: str, info: dict[str, Any]):
        self.handle = handle
        self._power_reader = self._probe_power(info)
        self._throttle_fn = self._probe_throttle(info)
        super().__init__(
            reason,
            info,
            [
                (("sm_clock_mhz",), lambda: self._call(pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)),
                (
                    ("mem_clock_mhz",),
                    lambda: self._call(pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_MEM),
                ),
                (("power_w",), self._power_reader),
                (("energy_mj",), lambda: self._call(pynvml.nvmlDeviceGetTotalEnergyConsumption)),
                (
                    ("temp_c",),
                    lambda: self._call(pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU),
                ),
                (("gpu_util_pct", "mem_util_pct"), self._utilization),
                (("mem_used_mb",), lambda: (_nvml(pynvml.nvmlDeviceGetMemoryInfo, handle).used / _MIB,)),
                (("pstate",), lambda: self._call(pynvml.nvmlDeviceGetPerformanceState)),
                (("throttle_reasons",), lambda: self._call(self._throttle_fn)),
            ],
        )

    def _call(self, fn: Callable[..., Any], *args: Any) -> tuple[Any]:
        """One counter read by `fn(handle, *args)`, as a 1-tuple."""
        return (_nvml(fn, self.handle, *args),)

    def _power_instant(self) -> tuple[float]:
        fields = _nvml(pynvml.nvmlDeviceGetFieldValues, self.handle, [pynvml.NVML_FI_DEV_POWER_INSTANT])
        return (_field_value(fields[0]) / 1000.0,)  # mW -> W

    def _power_average(self) -> tuple[float]:
        return (_nvml(pynvml.nvmlDeviceGetPowerUsage, self.handle) / 1000.0,)  # mW -> W

    def _probe_power(self, info: dict[str, Any]) -> Reader:
        """Instantaneous power where the driver has it, else nvmlDeviceGetPowerUsage (a 1 s average on recent
        GPUs); `info["power_field"]` records which (None when neither works)."""
        for field_name, reader in (
            ("NVML_FI_DEV_POWER_INSTANT", self._power_instant),
            ("nvmlDeviceGetPowerUsage", self._power_average),
        ):
            try:
                reader()
            except TelemetryError:
                continue
            info["power_field"] = field_name
            return reader
        info["power_field"] = None
        return self._power_average  # reports NotSupported on first read, then is skipped

    def _probe_throttle(self, info: dict[str, Any]) -> Callable[..., int]:
        """nvmlDeviceGetCurrentClocksEventReasons, or the older ...ThrottleReasons where it is missing."""
        events = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if events is not None:
            try:
                _nvml(events, self.handle)
            except TelemetryError:
                pass
            else:
                info["throttle_field"] = "nvmlDeviceGetCurrentClocksEventReasons"
                return events
        info["throttle_field"] = "nvmlDeviceGetCurrentClocksThrottleReasons"
        return pynvml.nvmlDeviceGetCurrentClocksThrottleReasons

    def sampler_spec(self) -> dict[str, Any]:
        """How a sampler process opens the same device (harness/telemetry/sampler.py): by UUID, which names it whatever
        CUDA_VISIBLE_DEVICES says by then (a sweep narrows it to the measured GPU after opening the source)."""
        return {"kind": "nvml", "uuid": self.info["uuid"]}

    def _utilization(self) -> tuple[int, int]:
        rates = _nvml(pynvml.nvmlDeviceGetUtilizationRates, self.handle)
        return (rates.gpu, rates.memory)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _visible_devices(env: str) -> list[str]:
    """CUDA_VISIBLE_DEVICES entries as CUDA reads them: up to the first invalid entry."""
    entries = []
    for raw in env.split(","):
        entry = raw.strip()
        if not (entry.startswith(("GPU-", "MIG-")) or entry.isdigit()):
            break
        entries.append(entry)
    return entries


def _device_handle(gpu_index: int) -> tuple[Any, str]:
    """NVML handle of CUDA device `gpu_index` in this process's view, and how it was found.

    With CUDA_VISIBLE_DEVICES set, its entry `gpu_index` names the device: a UUID ("GPU-..."/"MIG-...") or an
    NVML index. Without it the CUDA index is taken as the NVML index (right when CUDA_DEVICE_ORDER=PCI_BUS_ID
    or all GPUs are alike).
    """
    if gpu_index < 0:
        raise TelemetryError(f"--gpu {gpu_index}: a GPU index is 0 or more")
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = _nvml(pynvml.nvmlDeviceGetCount)
    if env is None:
        if gpu_index >= count:
            raise TelemetryError(f"--gpu {gpu_index}: NVML sees {count} GPU(s) (indices 0..{count - 1})")
        return _nvml(pynvml.nvmlDeviceGetHandleByIndex, gpu_index), f"NVML index {gpu_index}"
    visible = _visible_devices(env)
    if gpu_index >= len(visible):
        raise TelemetryError(
            f"--gpu {gpu_index}: CUDA_VISIBLE_DEVICES={env!r} makes {len(visible)} GPU(s) visible"
            + (f" (indices 0..{len(visible) - 1})" if visible else "")
        )
    entry = visible[gpu_index]
    where = f"CUDA_VISIBLE_DEVICES[{gpu_index}]={entry}"
    if entry.isdigit():
        if int(entry) >= count:
            raise TelemetryError(f"--gpu {gpu_index}: {where}, but NVML sees {count} GPU(s)")
        return _nvml(pynvml.nvmlDeviceGetHandleByIndex, int(entry)), where
    try:
        return _nvml(pynvml.nvmlDeviceGetHandleByUUID, entry), where
    except TelemetryError as exc:
        raise TelemetryError(f"--gpu {gpu_index}: {where}: no such GPU ({exc}); NVML needs the full UUID") from exc


def _open_nvml_device(gpu_index: int) -> NvmlSource:
    handle, where = _device_handle(gpu_index)
    info: dict[str, Any] = {
        "gpu_index": gpu_index,
        "device_selector": where,
        "device_name": _text(_nvml(pynvml.nvmlDeviceGetName, handle)),
        "uuid": _text(_nvml(pynvml.nvmlDeviceGetUUID, handle)),
        "driver_version": _text(_nvml(pynvml.nvmlSystemGetDriverVersion)),
    }
    with suppress(TelemetryError):
        info["max_sm_clock_mhz"] = _nvml(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_SM)
    with suppress(TelemetryError):
        info["power_limit_w"] = _nvml(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle) / 1000.0
    return NvmlSource(handle, reason=f"--gpu {gpu_index}: {where}", info=info)


@contextmanager
def open_source(gpu_index: int | None) -> Iterator[TelemetrySource]:
    """The telemetry source for a run: NVML for `--gpu N`, the host otherwise.

    NVML is initialized for the duration of the block and always shut down after it. A GPU that was asked for
    but cannot be read raises TelemetryError (no silent fallback to host telemetry).
    """
    if gpu_index is None:
        yield HostSource(reason="no --gpu given")
        return
    with _open_nvml(gpu_index) as source:
        yield source


@contextmanager
def open_host_source(pid: int) -> Iterator[TelemetrySource]:
    """Host counters for the process `pid` (its memory and its children's): what a sampler process reads."""
    yield HostSource(reason="no --gpu given", pid=pid)


@contextmanager
def _open_nvml(gpu_index: int) -> Iterator[NvmlSource]:
    if pynvml is None:
        raise TelemetryError(f"--gpu {gpu_index} asks for GPU telemetry, but nvidia-ml-py is not installed")
    try:
        _nvml(pynvml.nvmlInit)
    except TelemetryError as exc:
        raise TelemetryError(
            f"--gpu {gpu_index} asks for GPU telemetry, but NVML did not start ({exc}); is an NVIDIA driver loaded?"
        ) from exc
    try:
        yield _open_nvml_device(gpu_index)
    finally:
        with suppress(TelemetryError):  # nothing useful to do about a failed shutdown
            _nvml(pynvml.nvmlShutdown)


# --- sampling -----------------------------------------------------------------------------------------------


def timed_read(source: TelemetrySource) -> dict[str, Any]:
    """One sample stamped with `t_s`, the perf_counter time at the middle of the read (s)."""
    t0 = time.perf_counter()
    try:
        sample = source.read()
    except Exception as exc:  # read() catches counter errors; this is the last guard for the loop
        sample = {"source": source.name, "error": f"{type(exc).__name__}: {exc}"}
    sample["t_s"] = (t0 + time.perf_counter()) / 2
    return sample


def watch(source: TelemetrySource, seconds: float, interval_ms: float = 250.0) -> Iterator[dict[str, Any]]:
    """Live samples (with `t_s`) every `interval_ms` for `seconds` (math.inf: until interrupted), read in the
    caller's thread; the first one comes at once."""
    if not interval_ms > 0:
        raise ValueError(f"interval_ms must be > 0, got {interval_ms}")
    interval_s = interval_ms / 1000.0
    start = next_t = time.perf_counter()
    end = start + seconds
    while True:
        yield timed_read(source)
        next_t += interval_s
        now = time.perf_counter()
        if next_t > end:
            return
        if next_t < now:
            next_t = now
        time.sleep(next_t - now)


@contextmanager
def lock_clocks(source: TelemetrySource, mhz: int | None) -> Iterator[None]:
    """Lock the GPU's SM clock at `mhz` (MHz) for the block and always reset it after (exception and Ctrl-C
    included). `mhz` None does nothing. Needs root/admin."""
    if mhz is None:
        yield
        return
    if not isinstance(source, NvmlSource):
        raise TelemetryError(f"locking clocks needs GPU telemetry (--gpu N); telemetry here is {source.name}")
    if mhz <= 0:
        raise TelemetryError(f"clock lock must be a positive MHz value, got {mhz}")
    try:
        _nvml(pynvml.nvmlDeviceSetGpuLockedClocks, source.handle, mhz, mhz)
    except NoPermissionError as exc:
        raise TelemetryError(f"locking clocks needs root/admin: {exc}") from exc
    except NotSupportedError as exc:
        raise TelemetryError(f"this GPU cannot lock clocks: {exc}") from exc
    try:
        yield
    except BaseException:
        try:
            _nvml(pynvml.nvmlDeviceResetGpuLockedClocks, source.handle)
        except TelemetryError as exc:  # do not hide the error that is already on its way out
            log.error("could not reset locked GPU clocks (run `nvidia-smi -rgc`): %s", exc)
        raise
    try:
        _nvml(pynvml.nvmlDeviceResetGpuLockedClocks, source.handle)
    except TelemetryError as exc:
        raise TelemetryError(f"could not reset locked GPU clocks (run `nvidia-smi -rgc`): {exc}") from exc


def nvml_device_count() -> int:
    """How many GPUs NVML sees; 0 when nvidia-ml-py, the driver or a GPU is missing."""
    if pynvml is None:
        return 0
    try:
        _nvml(pynvml.nvmlInit)
    except TelemetryError:
        return 0
    try:
        return int(_nvml(pynvml.nvmlDeviceGetCount))
    except TelemetryError:
        return 0
    finally:
        with suppress(TelemetryError):
            _nvml(pynvml.nvmlShutdown)
