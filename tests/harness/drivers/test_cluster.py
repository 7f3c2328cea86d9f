"""Ray sweeps (harness/drivers/cluster.py): the worker checks, and two small real sweeps on a local Ray.

The slow tests run a local Ray with two single-core workers on this (2-core) machine, so `--ray-share-device` is
on: the two engines share the CPU and their timings interfere. They check the Ray run against the single-device
contract (the same checks as test_sweep_integration.py), the worker tags, a worker killed mid-group, and resume.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest

from harness.cli.app import ray_flag_default
from harness.drivers.cluster import RayOptions, check_workers, node_info, run_cluster_sweep
from harness.drivers.plan import SweepOptions
from harness.rundata.spec import SpecError
from tests.conftest import SMALL_SWEEP, run_profile
from tests.harness.drivers import test_sweep_integration as single

RAY_FLAGS = ["--ray", "--ray-cpus-per-worker", "1", "--ray-share-device"]


def _worker(**kw: Any) -> dict[str, Any]:
    return {"worker": "w1", "host": "node-b", "ip": "10.0.0.2", "vllm": "0.32.0", "torch": "2.13.0+cpu",
            "device_id": "GPU-1", "paths": {"/models/m": "abc"}, **kw}


DRIVER = {"host": "head", "vllm": "0.32.0", "torch": "2.13.0+cpu", "paths": {"/models/m": "abc"}}


def test_a_node_with_other_versions_is_refused_in_one_line() -> None:
    with pytest.raises(SpecError) as e:
        check_workers(DRIVER, [_worker(torch="2.12.0")], share_device=False)
    msg = str(e.value)
    assert "\n" not in msg and "node node-b (10.0.0.2, worker w1)" in msg and "torch 2.12.0" in msg


def test_a_node_that_does_not_see_a_model_folder_is_refused_in_one_line() -> None:
    with pytest.raises(SpecError) as e:
        check_workers(DRIVER, [_worker(paths={"/models/m": None})], share_device=False)
    assert "\n" not in str(e.value) and "node node-b" in str(e.value) and "does not see /models/m" in str(e.value)
    with pytest.raises(SpecError, match="sees another file at /models/m"):
        check_workers(DRIVER, [_worker(paths={"/models/m": "other"})], share_device=False)


def test_two_workers_on_one_device_need_share_device() -> None:
    two = [_worker(), _worker(worker="w2")]
    with pytest.raises(SpecError, match="--ray-share-device"):
        check_workers(DRIVER, two, share_device=False)
    check_workers(DRIVER, two, share_device=True)
    check_workers(DRIVER, [_worker(), _worker(worker="w2", device_id="GPU-2")], share_device=False)


def test_bare_ray_flag_means_a_local_ray() -> None:
    assert ray_flag_default(["profile", "sweep", "--ray"]) == ["profile", "sweep", "--ray", "local"]
    assert ray_flag_default(["sweep", "--ray", "--quiet"]) == ["sweep", "--ray", "local", "--quiet"]
    assert ray_flag_default(["sweep", "--ray", "auto"]) == ["sweep", "--ray", "auto"]


@pytest.fixture(scope="module")
def local_ray() -> Any:
    """A local Ray with 2 CPUs for the in-process tests (run_cluster_sweep joins it and leaves it running)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _small_spec(warmup: int = 1, max_new_tokens: int = 3) -> Any:
    """2 engine configs (block sizes) x 2 lengths; 2 distinct prompts + 1 repeat per point."""
    from harness.cli.app import resolve_spec

    return resolve_spec(None, None, {"tier": [0], "blocks": [32, 64], "text_tokens": [32, 64], "top_k": [0],
                                     "reps": 2, "same_prompt_repeats": 1, "max_new_tokens": max_new_tokens,
                                     "warmup_requests": warmup})


def test_a_version_mismatch_is_refused_before_any_engine_or_run_folder(
    local_ray: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = node_info
    monkeypatch.setattr("harness.drivers.cluster.node_info", lambda paths: {**real(paths), "vllm": "0.0.1"})
    ropts = RayOptions(cpus_per_worker=1, share_device=True)
    with pytest.raises(SpecError) as e:
        run_cluster_sweep(_small_spec(), SweepOptions(out_root=tmp_path), ropts, lambda ev, d: None)
    assert "\n" not in str(e.value) and "has vllm 0.32" in str(e.value) and "the driver has 0.0.1" in str(e.value)
    assert "worker w0" in str(e.value)
    assert not list(tmp_path.iterdir())  # no run folder


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The integration test's small sweep, on a local Ray with two single-core workers."""
    out = tmp_path_factory.mktemp("ray")
    proc = run_profile("sweep", *SMALL_SWEEP, *RAY_FLAGS, "--out", str(out), "--name", "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[w0@" in proc.stderr and "[w1@" in proc.stderr  # progress per worker
    return out / "run"


@pytest.mark.slow
def test_a_two_worker_sweep_keeps_the_single_device_contract(ray_run: Path) -> None:
    single.test_manifest_is_complete(ray_run)
    single.test_samples_follow_the_contract(ray_run)
    single.test_prompts_and_telemetry_written(ray_run)
    s = pd.read_parquet(ray_run / "samples")
    assert not s.duplicated(["point_id", "rep", "step_index"]).any()
    assert s.worker.notna().all() and s.node.notna().all() and s.device_id.notna().all()
    assert (s.groupby("engine_config_id").worker.nunique() == 1).all()  # a group stays on its worker
    t = pd.read_parquet(ray_run / "telemetry")
    assert t.worker.notna().all() and t.node.notna().all()
    m = json.loads((ray_run / "manifest.json").read_text())
    c = m["cluster"]
    assert c["store"]["where"] == "driver" and c["shared_device"] is True and m["environment"]["shared_device"]
    assert {w["worker"] for w in c["workers"]} == {"w0", "w1"} == set(s.worker)
    assert all(w["vllm"] == c["driver"]["vllm"] and w["torch"] == c["driver"]["torch"] for w in c["workers"])
    assert {st["worker"] for st in m["engine_starts"]} == {"w0", "w1"}
    assert sum(w["points_done"] for w in m["cluster_progress"].values()) == 6


@pytest.mark.slow
def test_a_worker_killed_mid_group_is_retried_and_resume_completes(local_ray: Any, tmp_path: Path) -> None:
    victims: dict[str, Any] = {}

    def report(event: str, data: dict[str, Any]) -> None:
        if event == "start":
            victims["pids"] = {w["worker"]: w["pid"] for w in data["workers"]}
        elif event == "engine" and not victims.get("killed"):  # the first engine up: kill its worker mid-group
            pid = victims["pids"][data["worker"]]
            victims["killed"], victims["engine"] = data["worker"], psutil.Process(pid).children(recursive=True)
            os.kill(pid, signal.SIGKILL)

    ropts = RayOptions(cpus_per_worker=1, share_device=True, max_retries=1)
    spec = _small_spec(warmup=40, max_new_tokens=8)  # a long warm-up: the kill lands before the group's points
    result = run_cluster_sweep(spec, SweepOptions(out_root=tmp_path, run_id="run"), ropts, report)
    run = tmp_path / "run"
    assert result.status == "complete" and result.points_done == 4, result
    lost = [json.loads(line) for line in (run / "failures.jsonl").read_text().splitlines()]
    assert lost and {f["error_type"] for f in lost} == {"WorkerLost"}
    assert {f["worker"] for f in lost} == {victims["killed"]} and len({f["engine_config_id"] for f in lost}) == 1
    s = pd.read_parquet(run / "samples")
    assert not s.duplicated(["point_id", "rep", "step_index"]).any() and s.point_id.nunique() == 4
    group = set(s[s.engine_config_id == lost[0]["engine_config_id"]].point_id)
    lost_ids = {f["point_id"] for f in lost}
    assert lost_ids | set(s[s.worker == victims["killed"]].point_id) == group  # each point: written or recorded
    assert victims["killed"] not in set(s[s.point_id.isin(lost_ids)].worker)  # retried on the other worker
    assert not [p for p in victims["engine"] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    # a point lost (as after a kill of the whole sweep): --resume with Ray completes it, every point once
    victim = sorted((run / "samples").glob("*.parquet"))[-1]
    victim.unlink()
    m = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**m, "status": "running"}))
    result = run_cluster_sweep(spec, SweepOptions(out_root=tmp_path, resume_dir=run),
                               RayOptions(workers=1, cpus_per_worker=1), lambda ev, d: None)
    assert result.status == "complete" and result.points_done == 4
    s = pd.read_parquet(run / "samples")
    assert len(s) == 4 * 3 * 8 and not s.duplicated(["point_id", "rep", "step_index"]).any()
    m = json.loads((run / "manifest.json").read_text())
    assert len(m["cluster_attempts"]) == 2 and m["status"] == "complete"
