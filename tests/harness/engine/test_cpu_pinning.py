"""CPU pinning (engine/cpu_pinning.py): the rule, the core plan from a fake sysfs, and pinning real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.engine.cpu_pinning import BIND_ENV, CpuPinning, PinPlan, physical_cores, plan_pinning


def _sysfs(root: Path, cpus: dict[int, tuple[int, int]]) -> Path:
    """A fake /sys/devices/system/cpu: cpu -> (NUMA node, core id), one package."""
    for cpu, (node, core) in cpus.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "core_id").write_text(f"{core}\n")
        (topo / "physical_package_id").write_text("0\n")
        (root / f"cpu{cpu}" / f"node{node}").mkdir()
    return root


def test_cores_are_grouped_by_physical_core_on_the_first_numa_node(tmp_path: Path) -> None:
    # 2 nodes; node 0 has cores 0-3 with SMT siblings 8-11; node 1 has cpus 4-7
    layout = {c: (0, c) for c in range(4)} | {c: (1, c) for c in range(4, 8)} | {c: (0, c - 8) for c in range(8, 12)}
    sys_cpu = _sysfs(tmp_path, layout)
    assert physical_cores(set(range(12)), sys_cpu) == [[0, 8], [1, 9], [2, 10], [3, 11]]
    assert physical_cores({1, 2, 9}, sys_cpu) == [[1, 9], [2]]


def test_pinning_needs_four_physical_cores_multiprocess_and_no_user_binding() -> None:
    four = [[0, 8], [1, 9], [2, 10], [3, 11]]
    plan = plan_pinning(True, "cpu", "multiprocess", env={}, cores=four)
    assert plan.applied
    assert (plan.harness_cpus, plan.engine_core_cpus, plan.worker_cpus) == ([3, 11], [2, 10], [0, 1])
    rec = plan.record()
    assert rec["engine_threads"] == 2 and rec["vllm_default_threads"] == 3 and ">= 4 physical cores" in rec["rule"]
    assert plan_pinning(True, "cpu", "multiprocess", env={BIND_ENV: "auto"}, cores=four).applied

    two = plan_pinning(True, "cpu", "multiprocess", env={}, cores=[[0], [1]])
    assert not two.applied and "2 physical core(s) (< 4)" in two.reason and two.record()["engine_threads"] is None
    assert "in-process" in plan_pinning(True, "cpu", "inprocess", env={}, cores=four).reason
    assert "set by the user" in plan_pinning(True, "cpu", "multiprocess", env={BIND_ENV: "0-3"}, cores=four).reason
    assert "turned off" in plan_pinning(False, "cpu", "multiprocess", env={}, cores=four).reason
    assert not plan_pinning(True, "cuda", "multiprocess", env={}, cores=four).applied


def test_the_binding_is_set_only_while_the_engine_spawns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BIND_ENV, raising=False)
    pins = CpuPinning(PinPlan(True, "test", harness_cpus=[3], engine_core_cpus=[2], worker_cpus=[0, 1]))
    with pins.spawning():
        assert os.environ[BIND_ENV] == "0,1"
    assert BIND_ENV not in os.environ
    with pytest.raises(RuntimeError), pins.spawning():  # a failed start leaves nothing behind
        raise RuntimeError("engine start failed")
    assert BIND_ENV not in os.environ
    with CpuPinning(PinPlan(False, "off")).spawning():
        assert BIND_ENV not in os.environ


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_harness_and_engine_core_are_pinned_and_the_harness_released() -> None:
    mine = sorted(os.sched_getaffinity(0))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        engine = SimpleNamespace(
            engine_core=SimpleNamespace(
                resources=SimpleNamespace(engine_manager=SimpleNamespace(processes=[SimpleNamespace(pid=child.pid)]))
            )
        )
        pins = CpuPinning(PinPlan(True, "test", harness_cpus=[mine[-1]], engine_core_cpus=[mine[0]]))
        pins.pin(engine)
        assert os.sched_getaffinity(0) == {mine[-1]}
        assert os.sched_getaffinity(child.pid) == {mine[0]}
        pins.release()
        assert sorted(os.sched_getaffinity(0)) == mine
    finally:
        child.kill()
        child.wait()
        os.sched_setaffinity(0, mine)
