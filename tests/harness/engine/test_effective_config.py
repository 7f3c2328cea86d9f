"""The running engine's config, read back after each start: stored in the manifest, checked against the axes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_profile

pytestmark = pytest.mark.slow


def test_effective_config_is_in_the_manifest(served_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, run = served_run
    (start,) = json.loads((run / "manifest.json").read_text())["engine_starts"]
    eff = start["effective"]
    assert eff["block_size"] == 32  # the blocks axis
    assert eff["num_gpu_blocks"] > 0 and eff["kv_cache_tokens"] == eff["num_gpu_blocks"] * 32
    assert eff["enable_prefix_caching"] is False
    assert eff["max_num_batched_tokens"] >= 96 + 3  # holds the longest prompt
    assert eff["async_scheduling"] is False  # the CPU platform turns it off
    assert eff["max_num_seqs"] >= 1 and eff["dtype"] and eff["compilation_mode"]
    assert isinstance(eff["cudagraph_capture_sizes"], list)
    assert "vllm_config" in eff["source"]


def test_an_axis_value_the_engine_changed_fails_its_points(tmp_path: Path) -> None:
    """The CPU platform turns async scheduling off whatever was asked: the points must fail, naming both."""
    spec = tmp_path / "async.toml"
    spec.write_text(
        "reps = 1\nsame_prompt_repeats = 0\nmax_new_tokens = 2\nwarmup_requests = 0\n"
        '[axes]\ntext_tokens = [32, 64]\ntier = [0]\ntop_k = [0]\nblocks = [32]\nasync = [true]\n'
        '[mapping]\nasync = "engine:async_scheduling"\n'
    )
    proc = run_profile("sweep", "--spec", str(spec), "--quiet", "--out", str(tmp_path / "r"), "--name", "run")
    assert proc.returncode == 1, proc.stderr[-3000:]
    run = tmp_path / "r" / "run"
    failures = [json.loads(line) for line in (run / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 2
    for f in failures:
        assert f["error_type"] == "MeasurementError"
        assert "the running engine has async_scheduling = False, but axis async = True" in f["error"]
    m = json.loads((run / "manifest.json").read_text())
    assert m["engine_starts"][0]["effective"]["async_scheduling"] is False
    assert not list((run / "samples").iterdir())


def test_engine_runs_with_served_defaults(served_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, run = served_run
    m = json.loads((run / "manifest.json").read_text())
    eff = m["engine_starts"][0]["effective"]
    # vllm serve's defaults on CPU (vLLM 0.32): no harness value for these
    assert eff["max_num_seqs"] == 128 and eff["max_num_batched_tokens"] == 2048
    assert eff["max_model_len"] == 4096  # the model's own context (cpu-tiny)
    ex = {e["arg"]: e for e in m["engine_exceptions"]}
    assert {"enable_prefix_caching", "kv_cache_memory_bytes"} <= set(ex) and "max_num_seqs" not in ex
    assert "max_num_batched_tokens" not in ex  # 2048 already holds the longest prompt (96)
    assert all(e["reason"] for e in ex.values())
    assert eff["kv_cache_memory_bytes"] == ex["kv_cache_memory_bytes"]["value"]
    assert "vllm serve" in m["engine_defaults"]


def test_cpu_pinning_and_cuda_versions_are_recorded(
    served_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    from harness.engine.cpu_pinning import plan_pinning

    _, run = served_run
    m = json.loads((run / "manifest.json").read_text())
    pin = m["engine_starts"][0]["effective"]["cpu_pinning"]
    here = plan_pinning(True, "cpu", "multiprocess")  # the rule on this machine (2 cores: not applied)
    assert pin["applied"] == here.applied and pin["reason"] == here.reason and ">= 4" in pin["rule"]
    assert pin["vllm_default_threads"] == here.vllm_default_threads
    env = m["environment"]
    assert env["vllm_build"] == "cpu" and env["cuda"] is None  # the CPU torch has no CUDA
    assert "cuda_driver" in env


def test_the_steady_placement_is_recorded_and_the_compute_thread_ran_alone(
    served_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """The steady engine's default (harness/engine/steady.py): on a machine too small for the cpu_pinning plan,
    every thread but the worker's compute thread goes to the reserved core, and the run shows where they ran."""
    from harness.engine.cpu_pinning import plan_pinning
    from harness.engine.steady import defaults

    _, run = served_run
    m = json.loads((run / "manifest.json").read_text())
    steady = m["engine_starts"][0]["effective"]["steady"]
    assert m["environment"]["steady"]["place"] == steady["place"] == defaults().place == "reserved"
    (threads,) = m["engine_threads"]
    assert threads["engine_config_id"] == m["engine_starts"][0]["engine_config_id"]
    assert {"caller", "engine_core", "worker", "compute", "machine"} <= set(threads)
    assert threads["compute"]["run_ms"] > 0 and threads["compute"]["cpus_seen"]
    if plan_pinning(True, "cpu", "multiprocess").applied:  # >= 4 physical cores: the older plan places them
        assert steady["placement"] is None
        return
    placement = steady["placement"]
    assert placement["applied"], placement["reason"]
    assert set(threads["compute"]["cpus_seen"]) <= set(placement["compute_cpus"])
    for role in ("caller", "engine_core"):
        assert threads[role]["affinity"] == placement["reserved_cpus"]
        assert not set(threads[role]["cpus_seen"]) & set(placement["compute_cpus"])
