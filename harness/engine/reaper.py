"""Engine processes die with the harness, however the harness dies.

vLLM's engine core is a child process that does not watch its parent: after a `kill -9` of the harness alone (what
the OOM killer does) it was still running minutes later, busy-polling (on a GPU box it would hold the GPU's memory).
Two guards:

- `stop_processes`: a bounded shutdown. After vLLM's own shutdown, wait for the engine's processes, then SIGTERM and
  SIGKILL what is left, so the harness never exits before its engine.
- `Reaper`: a watchdog process of its own session (a Ctrl-C or a signal to the harness's process group does not
  reach it) that holds the read end of a pipe from the harness and keeps a list of the harness's descendants. When
  the pipe closes, which the kernel does however the harness ends (`kill -9` included), the watchdog stops every
  listed process still alive (and its children). Run as `python -m harness.engine.reaper PID`: only the standard library
  and psutil load.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable

import psutil

GRACE_S = 3.0  # from SIGTERM to SIGKILL


def descendants(pids: Iterable[int]) -> list[psutil.Process]:
    """The processes `pids` and all their descendants that are alive now (each once, parents first)."""
    out: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            family = [p, *p.children(recursive=True)]
        except psutil.Error:
            continue
        for q in family:
            out.setdefault(q.pid, q)
    return list(out.values())


def stop_processes(procs: list[psutil.Process], wait_s: float = 5.0, grace_s: float = GRACE_S) -> list[int]:
    """Wait up to `wait_s` for `procs` to end on their own, then SIGTERM them, and SIGKILL any still alive
    `grace_s` later. Returns the pids that had to be signalled (empty: all ended by themselves)."""
    _, alive = psutil.wait_procs(procs, timeout=wait_s) if wait_s > 0 else ([], procs)
    signalled = [p.pid for p in alive]
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, alive = psutil.wait_procs(alive, timeout=wait)
        if not alive:
            break
    return signalled


class Reaper:
    """The watchdog of this harness process (started on first use, one per process).

    It remembers every descendant of the harness (a scan every POLL_S seconds, and one whenever `scan()` asks, e.g.
    right after an engine start), so processes started a moment before a kill are covered too.
    """

    _lock = threading.Lock()
    _instance: Reaper | None = None
    _owner_pid = -1

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "harness.engine.reaper", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # signals to the harness's process group do not reach it
        )

    @classmethod
    def get(cls) -> Reaper:
        """This process's reaper (a forked child gets its own)."""
        with cls._lock:
            if cls._instance is None or cls._owner_pid != os.getpid() or cls._instance._proc.poll() is not None:
                cls._instance, cls._owner_pid = Reaper(), os.getpid()
            return cls._instance

    @property
    def pid(self) -> int:
        return self._proc.pid

    def scan(self) -> None:
        """Have the watchdog look at the harness's descendants now (new engine processes are covered at once)."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self._proc.stdin.write(b"scan\n")  # type: ignore[union-attr]
            self._proc.stdin.flush()  # type: ignore[union-attr]


POLL_S = 2.0  # how often the watchdog lists the harness's descendants


def _serve(parent_pid: int, fd: int) -> None:
    """The watchdog's loop: remember the harness's descendants until the pipe closes, then stop those alive."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    me = os.getpid()
    seen: dict[int, float] = {}  # pid -> create_time (a reused pid is not killed)

    def scan() -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(parent_pid).children(recursive=True):
                if child.pid != me and child.pid not in seen:
                    with contextlib.suppress(psutil.Error):
                        seen[child.pid] = child.create_time()

    scan()
    while True:
        readable, _, _ = select.select([fd], [], [], POLL_S)
        if readable and not os.read(fd, 4096):
            break  # EOF: the harness has ended, however it ended
        scan()
    procs = []
    for pid, created in seen.items():
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.create_time() == created:
                procs.append(p)
    if procs:
        family = descendants(p.pid for p in procs)
        print(f"harness {parent_pid} ended: stopping {len(family)} leftover process(es)", file=sys.stderr)
        stop_processes(family, wait_s=0.0)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.stdin.fileno())
