"""Telemetry sampled beside the measurement: in a process of its own (the default), or in a thread.

A sampler thread inside the harness takes the GIL from the loop that times the steps: on 2 cores, sampling every
25 ms that way raised the decode-step CV p90 by 25 points (`scripts/bench_harness.py noise`). Power monitors such as
Zeus sample in a separate process; so does this one. The sampler process opens its own source (`sampler_spec()`:
NVML for the same GPU, or the host's counters with the harness's pid, for the memory of the harness and its
children) and keeps its samples until the harness drains them, at request boundaries, outside any timed step. Its
clock is the harness's: `time.perf_counter()` is CLOCK_MONOTONIC on Linux, one clock for every process of a machine.

Protocol (one JSON line each way): the parent writes `drain` or `stop`; the child answers
`{"samples": [...], "cpu_s": float}`. On start it answers `{"ready": true}` after its first sample. It ends on `stop`
or when its stdin closes (the harness died). The child runs as `python -m harness.telemetry.sampler SPEC_JSON`.

The thread mode samples a source object in this process (a source that cannot be reopened elsewhere, such as a test
double); `scripts/bench_harness.py noise` compares the two.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from contextlib import AbstractContextManager
from typing import Any, Literal

from harness.telemetry.sources import TelemetryError, TelemetrySource, open_host_source, open_source, timed_read

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
Mode = Literal["process", "thread"]


class TelemetrySampler:
    """Samples a source every `interval_ms` while the `with` block runs; `drain()` hands the samples over.

    A sample is taken on start and one more on stop, so the samples bracket the block. Ticks missed (a slow read)
    are skipped, not caught up. `mode="process"` (default) samples in a child process that reopens the source;
    `mode="thread"` in a thread of this process.
    """

    def __init__(self, source: TelemetrySource, interval_ms: float = 25.0, mode: Mode = "process"):
        if not interval_ms > 0:
            raise ValueError(f"interval_ms must be > 0, got {interval_ms}")
        if mode not in ("process", "thread"):
            raise ValueError(f"mode must be 'process' or 'thread', got {mode!r}")
        self.source = source
        self.interval_ms = float(interval_ms)
        self.mode = mode
        self._samples: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._cpu_s = 0.0

    def __enter__(self) -> TelemetrySampler:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start sampling (in process mode, return once the child took its first sample)."""
        if self.running:
            raise RuntimeError("the telemetry sampler is already running")
        if self.mode == "thread":
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="telemetry-sampler", daemon=True)
            self._thread.start()
            return
        spec = {**self.source.sampler_spec(), "interval_ms": self.interval_ms}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "harness.telemetry.sampler", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        reply = self._read(START_TIMEOUT_S)
        if not reply.get("ready"):
            self.stop()
            raise TelemetryError(f"the telemetry sampler process did not start: {reply.get('error', reply)}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Take the closing sample and stop; the samples wait for the next `drain()`."""
        if self.mode == "thread":
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout_s)
                if self._thread.is_alive():
                    log.warning("telemetry sampler did not stop within %.1f s", timeout_s)
            return
        if self._proc is None:
            return
        self._samples += self._ask("stop", timeout_s)
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for f in (self._proc.stdin, self._proc.stdout):
            if f is not None:
                f.close()

    @property
    def running(self) -> bool:
        """Whether the sampling thread or process is alive."""
        if self.mode == "thread":
            return self._thread is not None and self._thread.is_alive()
        return self._proc is not None and self._proc.poll() is None

    @property
    def cpu_seconds(self) -> float:
        """CPU time the sampling has used (s): the thread's own time, or the child process's, as of its last
        answer (drain or stop)."""
        return self._cpu_s

    def drain(self) -> list[dict[str, Any]]:
        """The samples taken since the last drain, oldest first (in process mode, one round trip to the child)."""
        fresh = self._ask("drain") if self.mode == "process" else []
        with self._lock:
            samples, self._samples = self._samples + fresh, []
        return samples

    # --- process mode ---------------------------------------------------------------------------------------

    def _read(self, timeout_s: float) -> dict[str, Any]:
        """The child's next answer (one line), or an error after `timeout_s` without one."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        line = proc.stdout.readline() if ready else ""
        if not line:
            return {"error": "no answer (the sampler process ended or hung)"}
        data: dict[str, Any] = json.loads(line)
        return data

    def _ask(self, command: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        proc = self._proc
        if proc is None or proc.poll() is not None or proc.stdin is None or proc.stdin.closed:
            return []
        try:
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
        except (OSError, ValueError):
            return []
        reply = self._read(timeout_s)
        if "error" in reply:
            log.warning("telemetry sampler: %s", reply["error"])
        self._cpu_s = float(reply.get("cpu_s", self._cpu_s))
        samples: list[dict[str, Any]] = reply.get("samples", [])
        return samples

    # --- thread mode ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        cpu0 = time.thread_time()
        interval_s = self.interval_ms / 1000.0
        next_t = time.perf_counter()
        while True:
            stopping = self._stop.is_set()
            sample = timed_read(self.source)
            with self._lock:
                self._samples.append(sample)
            self._cpu_s = time.thread_time() - cpu0
            if stopping:
                return
            next_t += interval_s
            delay = next_t - time.perf_counter()
            if delay < 0:
                next_t = time.perf_counter()
                delay = 0.0
            self._stop.wait(delay)


def open_for(spec: dict[str, Any]) -> AbstractContextManager[TelemetrySource]:
    """The source a sampler process reads, from its parent's `sampler_spec()`: the host's counters for the harness's
    pid, or the GPU with that UUID (made the only visible device of the sampler process)."""
    if spec["kind"] == "host":
        return open_host_source(int(spec["pid"]))
    os.environ["CUDA_VISIBLE_DEVICES"] = str(spec["uuid"])
    return open_source(0)


def _child(spec: dict[str, Any]) -> None:
    """The sampler process: sample every interval_ms; answer drain/stop on stdin; end when stdin closes."""
    interval_s = float(spec["interval_ms"]) / 1000.0
    samples: list[dict[str, Any]] = []
    lock = threading.Lock()
    done = threading.Event()

    def take(source: TelemetrySource) -> None:
        sample = timed_read(source)
        with lock:
            samples.append(sample)

    def answer() -> None:
        with lock:
            out, samples[:] = list(samples), []
        sys.stdout.write(json.dumps({"samples": out, "cpu_s": time.process_time()}) + "\n")
        sys.stdout.flush()

    def commands() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
            answer()
        done.set()  # `stop`, or stdin closed because the harness ended

    try:
        with open_for(spec) as source:
            take(source)
            sys.stdout.write(json.dumps({"ready": True}) + "\n")
            sys.stdout.flush()
            threading.Thread(target=commands, daemon=True).start()
            next_t = time.perf_counter()
            while True:
                next_t += interval_s
                delay = next_t - time.perf_counter()
                if delay < 0:  # missed ticks are skipped, not caught up
                    next_t, delay = time.perf_counter(), 0.0
                if done.wait(delay):
                    break
                take(source)
            take(source)  # the closing sample
            answer()
    except (TelemetryError, OSError, ValueError, KeyError) as exc:
        try:
            sys.stdout.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
            sys.stdout.flush()
        except OSError:
            pass


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
