"""The engine's own output (vLLM, torch, Triton, the engine-core process) kept out of the terminal, in engine.log.

vLLM's chatter does not all go through Python: Triton and torch print from C, and the engine core is a spawned
process that writes to the file descriptors it inherits. So the redirection is made at the descriptor level:
fds 1 and 2 of this process point at the log (children inherit that), while the harness's own messages go to
duplicates of the original terminal descriptors (`EngineOutput.stdout` / `.stderr`).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import TracebackType
from typing import IO

LOG_NAME = "engine.log"
# vLLM's log lines: "WARNING 11-27 13:20:58 [file.py:12] ..." or "[W1127 13:20:58 utils.cpp:68] Warning: ..." (c10)
_PREFIX = r"^(\([^)]*\)\s*)?"  # "(EngineCore pid=123) " on lines from vLLM's other processes
_WARNING = re.compile(_PREFIX + r"WARNING\s|^\[W\d{4} ")
_ERROR = re.compile(_PREFIX + r"(ERROR|CRITICAL)\s|^\[E\d{4} |^Traceback \(most recent call last\)")


# vLLM's own lines that end each phase of an engine start (v0.32 CPU build; a line it no longer writes leaves its
# phase out): the engine-core process is up (spawned, vLLM imported), the worker process is up, the model is
# built, torch.compile's warm-up is done (compiled or loaded from the inductor cache), and the engine is ready
# (memory profile, KV cache, warm-up runs).
START_MARKS = (
    ("engine_core_up", "Initializing a V1 LLM engine"),
    ("worker_up", "Starting to load model"),
    ("model_loaded", "Warming up model for the compilation"),
    ("compiled", "Warming up done"),
    ("ready", "init engine (profile, create kv cache, warmup model) took"),
)
_STAMP = re.compile(r"\d\d-\d\d (\d\d):(\d\d):(\d\d)")


def start_phases(text: str, started_at_s: float, seconds: float) -> dict[str, float]:
    """An engine start's breakdown from its log lines, seconds per phase (1 s resolution: vLLM stamps seconds):
    each phase ends at the first line of its mark in START_MARKS; `started_at_s` is the start's wall-clock time
    (epoch seconds) and `seconds` its length, whose rest after `ready` is `handshake` (the harness's side)."""
    t0 = time.localtime(started_at_s)
    base = started_at_s - (t0.tm_hour * 3600 + t0.tm_min * 60 + t0.tm_sec)
    out: dict[str, float] = {}
    last = started_at_s
    for name, mark in START_MARKS:
        line = next((ln for ln in text.splitlines() if mark in ln), None)
        stamp = _STAMP.search(line) if line else None
        if stamp is None:
            continue
        at = base + int(stamp[1]) * 3600 + int(stamp[2]) * 60 + int(stamp[3])
        at += 86400 if at < started_at_s - 43200 else 0  # past midnight
        out[name] = round(max(at - last, 0.0), 1)
        last = max(at, last)
    if out:
        out["handshake"] = round(max(started_at_s + seconds - last, 0.0), 1)
    return out


def count_levels(text: str) -> tuple[int, int]:
    """(warning lines, error lines) in a piece of engine log."""
    warnings = errors = 0
    for line in text.splitlines():
        if _ERROR.search(line):
            errors += 1
        elif _WARNING.search(line):
            warnings += 1
    return warnings, errors


class EngineOutput:
    """Redirects fds 1 and 2 into a log file for the rest of the process's life.

    `start()` captures into a temporary file (vLLM may be imported before the run folder exists); `attach(path)`
    moves what was captured into the run's engine.log and goes on there. With `verbose`, the output is also
    shown live (a thread copies a pipe to the terminal and the log).

    The descriptors are not restored at the end on purpose: Triton's nanobind bindings (imported by vLLM even
    on CPU) print "nanobind: leaked N instances/types/functions" from a `Py_AtExit` hook, i.e. with C's
    `fprintf(stderr)` after the interpreter is finalized: no Python-level atexit handler or `sys.stderr`
    swap reaches it, and nanobind's `set_leak_warnings(false)` is a C++ call Triton's module does not expose.
    With fd 2 still on the log, the report lands in engine.log and the exit code is untouched.
    """

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.path: Path | None = None
        self._lock = threading.Lock()
        self._sink: IO[bytes] | None = None  # where captured bytes go now (temp file, then the log)
        self._term_out_fd = os.dup(1)
        self._term_err_fd = os.dup(2)
        self.stdout: IO[str] = os.fdopen(self._term_out_fd, "w", buffering=1, encoding="utf-8", errors="replace")
        self.stderr: IO[str] = os.fdopen(self._term_err_fd, "w", buffering=1, encoding="utf-8", errors="replace")

    @staticmethod
    def possible() -> bool:
        """True when sys.stdout/sys.stderr are this process's fds 1 and 2 (not a test runner's buffers)."""
        try:
            return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError):
            return False

    def start(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self._sink = tempfile.TemporaryFile()  # noqa: SIM115 (open for the process's life)
        if self.verbose:
            read_fd, write_fd = os.pipe()
            os.dup2(write_fd, 1)
            os.dup2(write_fd, 2)
            os.close(write_fd)
            threading.Thread(target=self._tee, args=(read_fd,), name="harness-engine-log", daemon=True).start()
        else:
            os.dup2(self._sink.fileno(), 1)
            os.dup2(self._sink.fileno(), 2)
        # an unexpected harness error must still reach the terminal, not the log
        sys.excepthook = self._excepthook

    def attach(self, path: Path) -> None:
        """Go on writing into `path` (appended to: a resumed run keeps its earlier log)."""
        if self._sink is None or self.path is not None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        log = path.open("ab")  # noqa: SIM115 (open for the process's life)
        with self._lock:
            self._sink.flush()
            self._sink.seek(0)
            log.write(self._sink.read())
            log.flush()
            old, self._sink = self._sink, log
            if not self.verbose:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
            old.close()
        self.path = path

    def offset(self) -> int:
        """The log's size now (to count what an engine start adds to it)."""
        sys.stdout.flush()
        sys.stderr.flush()
        return self.path.stat().st_size if self.path is not None and self.path.exists() else 0

    def text_since(self, offset: int) -> str:
        """What was written to the log since `offset` ("" without a log)."""
        if self.path is None:
            return ""
        sys.stdout.flush()
        sys.stderr.flush()
        with self.path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")

    def _tee(self, read_fd: int) -> None:
        while True:
            try:
                chunk = os.read(read_fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            os.write(self._term_err_fd, chunk)
            with self._lock:
                if self._sink is not None and not self._sink.closed:
                    self._sink.write(chunk)
                    self._sink.flush()

    def _excepthook(self, kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        traceback.print_exception(kind, value, tb, file=self.stderr)
        if self.path is not None:
            print(f"(engine output in {self.path})", file=self.stderr)
