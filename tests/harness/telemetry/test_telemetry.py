"""Telemetry: the NVML wrapper (pynvml patched where harness.telemetry.sources imports it), host sampling, joins."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pandas as pd
import pynvml as real_nvml
import pytest

from harness.telemetry import sources as telemetry
from harness.telemetry.sampler import TelemetrySampler
from harness.telemetry.sources import TelemetryError, join_snapshots, lock_clocks, open_source

NVML_COUNTERS = list(telemetry.NVML_COLUMNS)
HOST_COUNTERS = list(telemetry.HOST_COLUMNS)


def _field(value_mw: int, ret: int = real_nvml.NVML_SUCCESS) -> SimpleNamespace:
    """A stand-in for c_nvmlFieldValue_t holding an unsigned int."""
    return SimpleNamespace(
        nvmlReturn=ret,
        valueType=real_nvml.NVML_VALUE_TYPE_UNSIGNED_INT,
        value=SimpleNamespace(uiVal=value_mw),
    )


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """pynvml patched in harness.telemetry.sources, with the real exception classes and constants; a healthy GPU."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with mock.patch("harness.telemetry.sources.pynvml", autospec=True) as m:
        for name in dir(real_nvml):
            if name.startswith(("NVMLError", "NVML_", "nvmlClocks")):
                setattr(m, name, getattr(real_nvml, name))
        m.nvmlDeviceGetCount.return_value = 4
        m.nvmlDeviceGetHandleByIndex.side_effect = lambda i: f"handle-{i}"
        m.nvmlDeviceGetHandleByUUID.side_effect = lambda uuid: f"handle-{uuid}"
        m.nvmlDeviceGetName.return_value = "NVIDIA H100 80GB HBM3"
        m.nvmlDeviceGetUUID.return_value = "GPU-1111"
        m.nvmlSystemGetDriverVersion.return_value = "550.54.15"
        m.nvmlDeviceGetMaxClockInfo.return_value = 1980
        m.nvmlDeviceGetEnforcedPowerLimit.return_value = 700_000
        m.nvmlDeviceGetFieldValues.return_value = [_field(312_500)]
        m.nvmlDeviceGetPowerUsage.return_value = 250_000
        m.nvmlDeviceGetClockInfo.side_effect = lambda h, kind: {real_nvml.NVML_CLOCK_SM: 1755}.get(kind, 2619)
        m.nvmlDeviceGetTotalEnergyConsumption.return_value = 123_456
        m.nvmlDeviceGetTemperature.return_value = 41
        m.nvmlDeviceGetUtilizationRates.return_value = SimpleNamespace(gpu=97, memory=35)
        m.nvmlDeviceGetMemoryInfo.return_value = SimpleNamespace(used=3 * 1024**3)
        m.nvmlDeviceGetPerformanceState.return_value = 0
        m.nvmlDeviceGetCurrentClocksEventReasons.return_value = 0x4
        m.nvmlDeviceGetCurrentClocksThrottleReasons.return_value = 0x20
        yield m


# --- NVML device selection ----------------------------------------------------------------------------------


def test_gpu_index_is_nvml_index_without_cuda_visible_devices(nvml: Any) -> None:
    with open_source(2) as source:
        assert source.name == "nvml"
        assert source.info["device_name"] == "NVIDIA H100 80GB HBM3"
        assert source.info["uuid"] == "GPU-1111"
        assert source.info["driver_version"] == "550.54.15"
        nvml.nvmlShutdown.assert_not_called()
    nvml.nvmlInit.assert_called_once_with()
    nvml.nvmlDeviceGetHandleByIndex.assert_called_once_with(2)
    nvml.nvmlDeviceGetHandleByUUID.assert_not_called()
    nvml.nvmlShutdown.assert_called_once_with()


# (CUDA_VISIBLE_DEVICES, --gpu, NVML index looked up, UUID looked up); one patch for all: autospec is slow
VISIBLE_DEVICE_CASES = [
    ("2,3", 1, 3, None),
    (" 3 , 0", 0, 3, None),
    ("GPU-aaaa,GPU-bbbb", 1, None, "GPU-bbbb"),
    ("MIG-cccc", 0, None, "MIG-cccc"),
    ("1,GPU-dddd", 1, None, "GPU-dddd"),
]


def test_gpu_index_maps_through_cuda_visible_devices(nvml: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for visible, gpu, by_index, by_uuid in VISIBLE_DEVICE_CASES:
        nvml.reset_mock()
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        with open_source(gpu) as source:
            assert isinstance(source, telemetry.NvmlSource)
            assert source.handle == f"handle-{by_index if by_uuid is None else by_uuid}", visible
            assert f"CUDA_VISIBLE_DEVICES[{gpu}]=" in source.info["device_selector"]
        if by_uuid is None:
            nvml.nvmlDeviceGetHandleByIndex.assert_called_once_with(by_index)
            nvml.nvmlDeviceGetHandleByUUID.assert_not_called()
        else:
            nvml.nvmlDeviceGetHandleByUUID.assert_called_once_with(by_uuid)
            nvml.nvmlDeviceGetHandleByIndex.assert_not_called()
        nvml.nvmlShutdown.assert_called_once_with()


# (CUDA_VISIBLE_DEVICES or None for unset, --gpu, what the error says)
MISSING_GPU_CASES = [
    (None, 4, "--gpu 4: NVML sees 4 GPU(s) (indices 0..3)"),
    (None, -1, "0 or more"),
    ("0,1", 2, "CUDA_VISIBLE_DEVICES='0,1' makes 2 GPU(s) visible"),
    ("", 0, "makes 0 GPU(s) visible"),
    ("0,-1,2", 1, "makes 1 GPU(s) visible"),  # CUDA stops reading at the first invalid entry
    ("7", 0, "CUDA_VISIBLE_DEVICES[0]=7, but NVML sees 4 GPU(s)"),
]


def test_missing_gpu_is_a_clear_error_and_nvml_still_shuts_down(
    nvml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for visible, gpu, message in MISSING_GPU_CASES:
        nvml.reset_mock()
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        with pytest.raises(TelemetryError, match=re.escape(message)) as err, open_source(gpu):
            pass
        assert "\n" not in str(err.value)
        nvml.nvmlDeviceGetHandleByIndex.assert_not_called()
        nvml.nvmlShutdown.assert_called_once_with()


def test_unknown_uuid_is_a_telemetry_error(nvml: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-nope")
    nvml.nvmlDeviceGetHandleByUUID.side_effect = real_nvml.NVMLError_NotFound()
    with (
        pytest.raises(TelemetryError, match=r"CUDA_VISIBLE_DEVICES\[0\]=GPU-nope: no such GPU"),
        open_source(0),
    ):
        pass
    nvml.nvmlShutdown.assert_called_once_with()


def test_nvml_that_does_not_start_raises_instead_of_falling_back(nvml: Any) -> None:
    nvml.nvmlInit.side_effect = real_nvml.NVMLError_DriverNotLoaded()
    message = "--gpu 0 asks for GPU telemetry, but NVML did not start"
    with pytest.raises(TelemetryError, match=message), open_source(0):
        pass
    nvml.nvmlShutdown.assert_not_called()


def test_no_gpu_requested_gives_host_source_without_touching_nvml(nvml: Any) -> None:
    with open_source(None) as source:
        assert (source.name, source.reason) == ("host", "no --gpu given")
        assert set(source.read()) >= {"source", *HOST_COUNTERS}
    nvml.nvmlInit.assert_not_called()


def test_nvml_shuts_down_when_the_block_raises(nvml: Any) -> None:
    with pytest.raises(RuntimeError, match="boom"), open_source(0):
        raise RuntimeError("boom")
    nvml.nvmlShutdown.assert_called_once_with()


# --- NVML reads ---------------------------------------------------------------------------------------------


def test_nvml_sample_has_every_counter_in_units(nvml: Any) -> None:
    with open_source(0) as source:
        sample = source.read()
        assert source.info["power_field"] == "NVML_FI_DEV_POWER_INSTANT"
        assert source.info["throttle_field"] == "nvmlDeviceGetCurrentClocksEventReasons"
        assert source.info["power_limit_w"] == 700.0
    assert sample == {
        "source": "nvml",
        "sm_clock_mhz": 1755,
        "mem_clock_mhz": 2619,
        "power_w": 312.5,
        "energy_mj": 123_456,
        "temp_c": 41,
        "gpu_util_pct": 97,
        "mem_util_pct": 35,
        "mem_used_mb": 3072.0,
        "pstate": 0,
        "throttle_reasons": 0x4,
    }
    nvml.nvmlDeviceGetFieldValues.assert_called_with("handle-0", [real_nvml.NVML_FI_DEV_POWER_INSTANT])
    nvml.nvmlDeviceGetPowerUsage.assert_not_called()


def test_power_falls_back_to_average_and_throttle_to_old_call(nvml: Any) -> None:
    nvml.nvmlDeviceGetFieldValues.return_value = [_field(0, ret=real_nvml.NVML_ERROR_NOT_SUPPORTED)]
    nvml.nvmlDeviceGetCurrentClocksEventReasons.side_effect = real_nvml.NVMLError_FunctionNotFound()
    with open_source(0) as source:
        sample = source.read()
        assert source.info["power_field"] == "nvmlDeviceGetPowerUsage"
        assert source.info["throttle_field"] == "nvmlDeviceGetCurrentClocksThrottleReasons"
    assert sample["power_w"] == 250.0
    assert sample["throttle_reasons"] == 0x20
    assert "error" not in sample


def test_unsupported_counter_is_none_and_not_retried(nvml: Any) -> None:
    nvml.nvmlDeviceGetTemperature.side_effect = real_nvml.NVMLError_NotSupported()
    nvml.nvmlDeviceGetPerformanceState.side_effect = real_nvml.NVMLError_FunctionNotFound()  # an older driver
    with open_source(0) as source:
        samples = [source.read() for _ in range(3)]
        assert source.unsupported == ["temp_c", "pstate"]
    assert [(s["temp_c"], s["pstate"]) for s in samples] == [(None, None)] * 3
    assert all("error" not in s for s in samples)
    assert nvml.nvmlDeviceGetTemperature.call_count == 1
    assert nvml.nvmlDeviceGetPerformanceState.call_count == 1
    assert [s["sm_clock_mhz"] for s in samples] == [1755] * 3


def test_a_sampler_process_opens_the_same_gpu_by_uuid(nvml: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep opens GPU 3, then narrows CUDA_VISIBLE_DEVICES to it; the sampler process (its opening code run here,
    where NVML is faked) must still find that GPU: by UUID, not by an index that means another device by then."""
    from harness.telemetry.sampler import open_for

    nvml.nvmlDeviceGetUUID.return_value = "GPU-3333"
    with open_source(3) as source:
        spec = source.sampler_spec()
    assert spec == {"kind": "nvml", "uuid": "GPU-3333"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # what the sweep's _select_gpu leaves behind
    with open_for(spec) as reopened:
        assert reopened.name == "nvml" and reopened.info["device_selector"] == "CUDA_VISIBLE_DEVICES[0]=GPU-3333"
        assert reopened.read()["sm_clock_mhz"] == 1755
    nvml.nvmlDeviceGetHandleByUUID.assert_called_with("GPU-3333")


def test_nvml_error_mid_run_records_a_gap_and_sampling_goes_on(nvml: Any) -> None:
    calls = {"n": 0}

    def clock(handle: Any, kind: int) -> int:
        calls["n"] += 1
        if kind == real_nvml.NVML_CLOCK_SM and 3 <= calls["n"] <= 6:
            raise real_nvml.NVMLError_GpuIsLost()
        return 1500

    nvml.nvmlDeviceGetClockInfo.side_effect = clock
    with open_source(0) as source, TelemetrySampler(source, interval_ms=2, mode="thread") as sampler:
        deadline = time.perf_counter() + 5
        while nvml.nvmlDeviceGetClockInfo.call_count < 24 and time.perf_counter() < deadline:
            time.sleep(0.005)
    samples = sampler.drain()
    assert len(samples) >= 12
    sm = [s["sm_clock_mhz"] for s in samples]
    gap = [i for i, s in enumerate(samples) if "error" in s]
    assert gap, "the failing reads must leave a visible gap"
    assert all(sm[i] is None and "sm_clock_mhz: NVML: GPU is lost" in samples[i]["error"] for i in gap)
    assert all(samples[i]["mem_clock_mhz"] == 1500 for i in gap)  # other counters still read
    assert sm[-1] == 1500 and max(gap) < len(samples) - 1  # and the counter came back afterwards
    assert "sm_clock_mhz" not in source.unsupported


# --- clock locking ------------------------------------------------------------------------------------------


def test_lock_clocks_always_resets(nvml: Any) -> None:
    with open_source(0) as source:
        for exc in (RuntimeError("step failed"), KeyboardInterrupt()):
            nvml.reset_mock()
            with pytest.raises(type(exc)), lock_clocks(source, 1410):
                nvml.nvmlDeviceSetGpuLockedClocks.assert_called_once_with("handle-0", 1410, 1410)
                nvml.nvmlDeviceResetGpuLockedClocks.assert_not_called()
                raise exc
            nvml.nvmlDeviceResetGpuLockedClocks.assert_called_once_with("handle-0")
        nvml.reset_mock()
        with lock_clocks(source, 1200):
            nvml.nvmlDeviceSetGpuLockedClocks.assert_called_once_with("handle-0", 1200, 1200)
        nvml.nvmlDeviceResetGpuLockedClocks.assert_called_once_with("handle-0")


def test_lock_clocks_without_permission_says_so(nvml: Any) -> None:
    nvml.nvmlDeviceSetGpuLockedClocks.side_effect = real_nvml.NVMLError_NoPermission()
    message = "^locking clocks needs root/admin: NVML: Insufficient Permissions$"
    with open_source(0) as source, pytest.raises(TelemetryError, match=message), lock_clocks(source, 1410):
        pytest.fail("the block must not run")
    nvml.nvmlShutdown.assert_called_once_with()


def test_lock_clocks_failed_reset_is_reported(nvml: Any) -> None:
    nvml.nvmlDeviceResetGpuLockedClocks.side_effect = real_nvml.NVMLError_Unknown()
    with open_source(0) as source, pytest.raises(TelemetryError, match="nvidia-smi -rgc"):
        with lock_clocks(source, 1410):
            pass
        pytest.fail("unreachable")  # keeps the reset failure inside pytest.raises, not open_source


def test_lock_clocks_none_is_a_no_op_and_host_refuses(nvml: Any) -> None:
    with open_source(0) as source, lock_clocks(source, None):
        pass
    nvml.nvmlDeviceSetGpuLockedClocks.assert_not_called()
    nvml.nvmlDeviceResetGpuLockedClocks.assert_not_called()
    with open_source(None) as host:
        with lock_clocks(host, None):
            pass
        with pytest.raises(TelemetryError, match="needs GPU telemetry"), lock_clocks(host, 1410):
            pass


# --- host telemetry, for real -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_host_sampler_runs_beside_the_caller(mode: str) -> None:
    with open_source(None) as source:
        t0 = time.perf_counter()
        with TelemetrySampler(source, interval_ms=25, mode=mode) as sampler:  # type: ignore[arg-type]
            time.sleep(0.3)
        t1 = time.perf_counter()
    samples = sampler.drain()
    assert 5 <= len(samples) <= 18  # ~13 ticks + the closing sample (fewer on a loaded machine)
    assert sampler.drain() == []
    times = [s["t_s"] for s in samples]
    assert times == sorted(times) and t0 <= times[0] and times[-1] <= t1  # perf_counter clock, in either process
    assert all(s["source"] == "host" for s in samples)
    assert all(s["rss_mb"] > 5 for s in samples)
    assert samples[0]["cpu_util_pct"] is None  # the thread's first psutil reading means nothing
    assert all(0 <= s["cpu_util_pct"] <= 100 for s in samples[1:])
    # the thread's own CPU time; the child's, start-up imports included
    assert 0 < sampler.cpu_seconds < (0.3 if mode == "thread" else 2.0)
    assert not sampler.running


def test_sampler_process_reads_this_process_and_is_joined_to_steps() -> None:
    """The sampler process counts the harness's memory (not its own), drains mid-run, and its samples join onto
    steps timed here: each step gets the sample nearest its window on the one perf_counter clock."""
    import os

    import pandas as pd

    ballast = bytearray(64 << 20)  # 64 MiB in this process: the child must report this process's memory
    with open_source(None) as source, TelemetrySampler(source, interval_ms=10) as sampler:
        assert sampler.running and sampler.source.sampler_spec() == {"kind": "host", "pid": os.getpid()}
        steps = []
        for i in range(6):
            t0 = time.perf_counter()
            time.sleep(0.03)
            steps.append({"point_id": "p", "rep": 0, "step_index": i, "t_start_s": t0, "t_end_s": time.perf_counter()})
        first = sampler.drain()  # mid-run, as at a request boundary
        time.sleep(0.05)
    rest = sampler.drain()
    assert first and rest and first[-1]["t_s"] < rest[0]["t_s"]
    samples = first + rest
    assert all(s["rss_mb"] > 64 for s in samples)
    assert len(ballast) == 64 << 20
    frame = telemetry.telemetry_frame(samples, "host")
    joined = join_snapshots(pd.DataFrame(steps), frame)
    assert len(joined) == 6 and (joined["tel_rss_mb"] > 64).all() and joined["tel_load_avg_1m"].notna().all()
    # each step's nearest sample lies inside its own window (10 ms ticks, 30 ms steps): no step took another's
    times = frame.t_s.to_numpy()
    for st in steps:
        mid = (st["t_start_s"] + st["t_end_s"]) / 2
        nearest = times[abs(times - mid).argmin()]
        assert st["t_start_s"] <= nearest <= st["t_end_s"]


def test_sampler_process_ends_when_the_harness_does() -> None:
    """The child reads its commands from the harness's pipe: when the pipe closes (the harness died), it exits."""
    with open_source(None) as source:
        sampler = TelemetrySampler(source, interval_ms=25)
        sampler.start()
        proc = sampler._proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.close()  # what the kernel does when the harness dies
        assert proc.wait(timeout=10) == 0


def test_host_rss_includes_child_processes() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "b = bytearray(80 * 2**20); print('ready', flush=True); import time; time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with open_source(None) as source:
            with_child = source.read()["rss_mb"]
            own = source._proc.memory_info().rss / 2**20  # type: ignore[attr-defined]
        assert with_child - own > 70
    finally:
        child.kill()
        child.wait()


def test_sampler_stops_promptly_and_keeps_going_after_a_read_error() -> None:
    class Flaky(telemetry.TelemetrySource):
        name = "host"

        def __init__(self) -> None:
            super().__init__("test", {}, [])
            self.n = 0

        def read(self) -> dict[str, Any]:
            self.n += 1
            if self.n == 2:
                raise OSError("sensor went away")
            return {"source": "host"}

    sampler = TelemetrySampler(Flaky(), interval_ms=1000, mode="thread")
    with sampler:
        time.sleep(0.05)
        t = time.perf_counter()
    assert time.perf_counter() - t < 0.5  # no waiting out the 1 s interval
    samples = sampler.drain()
    assert len(samples) == 2  # the first tick and the closing sample, whose read failed
    assert samples[1]["error"] == "OSError: sensor went away"


def test_watch_yields_live_samples_for_the_given_time() -> None:
    with open_source(None) as source:
        t0 = time.perf_counter()
        samples = list(telemetry.watch(source, seconds=0.2, interval_ms=50))
        elapsed = time.perf_counter() - t0
    assert 3 <= len(samples) <= 6  # at 0, 50, ..., 200 ms (ticks missed under load are skipped)
    assert elapsed < 0.35
    times = [s["t_s"] for s in samples]
    assert times == sorted(times) and times[-1] - times[0] > 0.14


def test_module_imports_without_cli_or_engine_packages() -> None:
    code = (
        "import sys, harness.telemetry.sources; "
        "bad = {'vllm', 'typer', 'rich', 'pandas', 'torch', 'psutil'} & set(sys.modules); "
        "sys.exit(f'imported {sorted(bad)}' if bad else 0)"
    )
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr + done.stdout


# --- join_snapshots -----------------------------------------------------------------------------------------


def _steps(rows: list[tuple[str, int, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["point_id", "rep", "t_start_s", "t_end_s"])


def _nvml_telemetry(n: int = 21, dt: float = 0.025, throttle: int = 0) -> pd.DataFrame:
    """Samples every `dt` s from t=10 s: 200 W, energy counter rising at 200 J/s."""
    samples = [
        {
            "t_s": 10 + i * dt,
            "source": "nvml",
            "sm_clock_mhz": 1000 + i,
            "power_w": 200.0,
            "energy_mj": 1_000_000 + round(200_000 * i * dt),
            "throttle_reasons": throttle,
        }
        for i in range(n)
    ]
    return telemetry.telemetry_frame(samples, "nvml")


def test_join_takes_the_sample_nearest_the_step_midpoint() -> None:
    steps = _steps([("p", 0, 10.100, 10.110), ("p", 0, 10.020, 10.024), ("p", 0, 30.0, 30.1)])
    steps.index = [7, 3, 5]
    out = join_snapshots(steps, _nvml_telemetry())
    assert list(out.index) == [7, 3, 5]  # order and index kept
    # midpoints 10.105 -> sample 4 (t=10.100); 10.022 -> sample 1 (t=10.025); 30.05 -> none within 1 s
    assert out["tel_sm_clock_mhz"].tolist()[:2] == [1004, 1001]
    assert out["tel_sm_clock_mhz"].isna().tolist() == [False, False, True]
    assert {f"tel_{c}" for c in NVML_COUNTERS} <= set(out.columns)
    assert not {"tel_t_s", "tel_source", "tel_error"} & set(out.columns)


@pytest.mark.parametrize(
    ("bits", "throttled"),
    [
        (0x0, False),
        (0x1, False),  # idle
        (0x2, False),  # applications clocks (set for the whole run by --lock-clocks)
        (0x10, False),  # sync boost
        (0x100, False),  # display clock setting
        (0x1 | 0x2 | 0x10 | 0x100, False),
        (0x4, True),  # software power cap
        (0x8, True),  # hardware slowdown
        (0x20, True),  # software thermal
        (0x40, True),  # hardware thermal
        (0x80, True),  # power brake
        (0x2 | 0x4, True),
        (0x200, True),  # board limit (older throttle-reason bit)
    ],
)
def test_throttled_counts_only_slowdown_reasons(bits: int, throttled: bool) -> None:
    out = join_snapshots(_steps([("p", 0, 10.1, 10.2)]), _nvml_telemetry(throttle=bits))
    assert out["throttled"].tolist() == [throttled]
    assert out["throttled"].dtype == bool


def test_request_energy_from_counter_or_power_estimate() -> None:
    tel = _nvml_telemetry()  # 10.0 .. 10.5 s
    steps = _steps(
        [
            ("a", 0, 10.05, 10.15),  # request a/0: 10.05..10.25 = 200 ms -> counter, 40 J
            ("a", 0, 10.15, 10.25),
            ("a", 1, 10.30, 10.35),  # 50 ms -> estimate 200 W x 0.05 s = 10 J
        ]
    )
    out = join_snapshots(steps, tel)
    assert out["request_energy_j"].tolist() == pytest.approx([40.0, 40.0, 10.0])
    assert out["request_energy_is_estimate"].tolist() == [False, False, True]
    # the same long request with the counter missing: estimate from power x duration
    out = join_snapshots(steps, tel.assign(energy_mj=pd.array([None] * len(tel), dtype="Int64")))
    assert out["request_energy_j"].tolist() == pytest.approx([40.0, 40.0, 10.0])
    assert out["request_energy_is_estimate"].tolist() == [True, True, True]
    # the counter used for real: a faster counter gives a different answer from the power figure
    out = join_snapshots(steps[:2], tel.assign(energy_mj=tel["energy_mj"] * 2 - 1_000_000))
    assert out["request_energy_j"].tolist() == pytest.approx([80.0, 80.0])


def test_host_telemetry_has_no_energy_and_is_never_throttled() -> None:
    samples = [{"t_s": 10 + i * 0.025, "source": "host", "cpu_util_pct": 50.0} for i in range(20)]
    out = join_snapshots(_steps([("p", 0, 10.1, 10.3)]), telemetry.telemetry_frame(samples, "host"))
    assert out["tel_cpu_util_pct"].tolist() == [50.0]
    assert out["throttled"].tolist() == [False]
    assert math.isnan(out["request_energy_j"].iloc[0])
    assert out["request_energy_is_estimate"].tolist() == [False]


@pytest.mark.parametrize("source", ["nvml", "host"])
def test_join_with_empty_telemetry_gives_null_columns(source: str) -> None:
    out = join_snapshots(
        _steps([("p", 0, 1.0, 1.2), ("p", 1, 2.0, 2.1)]), telemetry.telemetry_frame([], source)
    )
    counters = [f"tel_{c}" for c in telemetry.COLUMNS[source]]
    assert set(counters) <= set(out.columns)
    assert out[counters].isna().all().all()
    assert out["throttled"].tolist() == [False, False]
    assert out["request_energy_j"].isna().all()
    assert (
        out["tel_" + next(iter(telemetry.COLUMNS[source]))].dtype
        == telemetry.telemetry_frame([], source).dtypes.iloc[2]
    )


def test_join_with_a_bare_empty_frame() -> None:
    out = join_snapshots(_steps([("p", 0, 1.0, 1.2)]), pd.DataFrame())
    assert out["throttled"].tolist() == [False]
    assert out["request_energy_j"].isna().all()


def test_decode_throttle_reasons() -> None:
    assert telemetry.decode_throttle_reasons(0x45) == ["gpu_idle", "sw_power_cap", "hw_thermal_slowdown"]
    assert telemetry.decode_throttle_reasons(0x1000) == ["0x1000"]
    assert telemetry.decode_throttle_reasons(None) == []


def test_throttle_bits_match_the_installed_nvml() -> None:
    """The bit values are NVML's own (nvmlClocksEventReason* / nvmlClocksThrottleReason* in pynvml)."""
    names = {
        "GpuIdle": "gpu_idle", "ApplicationsClocksSetting": "applications_clocks_setting",
        "SwPowerCap": "sw_power_cap", "HwSlowdown": "hw_slowdown", "SyncBoost": "sync_boost",
        "SwThermalSlowdown": "sw_thermal_slowdown", "HwThermalSlowdown": "hw_thermal_slowdown",
        "HwPowerBrakeSlowdown": "hw_power_brake_slowdown", "DisplayClockSetting": "display_clock_setting",
    }
    by_name = {v: k for k, v in telemetry.THROTTLE_REASON_NAMES.items()}
    for nvml_name, ours in names.items():
        assert getattr(real_nvml, f"nvmlClocksThrottleReason{nvml_name}") == by_name[ours]
    ignored = ("GpuIdle", "ApplicationsClocksSetting", "SyncBoost", "DisplayClockSetting")
    bits = [getattr(real_nvml, f"nvmlClocksThrottleReason{n}") for n in ignored]
    assert sum(bits) == telemetry.THROTTLE_IGNORED_BITS
