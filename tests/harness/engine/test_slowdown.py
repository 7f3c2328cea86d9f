"""The injected slowdown (harness/engine/slowdown.py), the detection study's one fake: the variable's parsing, the
wrapped step's sleep, the plugin's registration, and the sweep's refusal of a bad value."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from estimator.nightly.interleave import SLOWDOWN_ENV
from harness.cli.app import app
from harness.engine import slowdown


def test_the_variable_is_a_fraction_of_a_step() -> None:
    assert slowdown.ENV == SLOWDOWN_ENV  # the estimator spells it without importing the harness
    assert slowdown.injected_slowdown({}) == 0.0
    assert slowdown.injected_slowdown({slowdown.ENV: " "}) == 0.0
    assert slowdown.injected_slowdown({slowdown.ENV: "0.10"}) == pytest.approx(0.1)
    for bad, why in (("ten", "not a number"), ("1.5", "outside"), ("-0.1", "outside")):
        with pytest.raises(ValueError, match=why):
            slowdown.injected_slowdown({slowdown.ENV: bad})


def test_a_slowed_step_takes_one_plus_the_fraction_as_long() -> None:
    def step(x: int) -> int:
        time.sleep(0.05)
        return x + 1

    slowed = slowdown.slowed(step, 0.5)
    t0 = time.perf_counter()
    assert slowed(1) == 2
    took = time.perf_counter() - t0
    assert took >= 0.075  # 50 ms of step, then 25 ms of waiting (the wait never ends early)
    assert slowed.__name__ == "step" and slowed.__llm_latency_slowdown__ == 0.5
    for wait_s in (0.0, 0.0001, 0.002):  # the yielding spin alone, and a sleep before it
        end = time.perf_counter() + wait_s
        slowdown.wait_until(end)
        assert time.perf_counter() >= end


def test_the_plugin_patches_the_engine_core_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.engine.core import EngineCore

    originals: dict[str, Any] = {n: getattr(EngineCore, n) for n in ("step", "step_with_batch_queue")}
    monkeypatch.delenv(slowdown.ENV, raising=False)
    slowdown.register()
    assert all(getattr(EngineCore, n) is f for n, f in originals.items())  # unset: nothing changes
    for name, fn in originals.items():
        monkeypatch.setattr(EngineCore, name, fn)  # restored by monkeypatch at the end
    monkeypatch.setenv(slowdown.ENV, "0.2")
    slowdown.register()
    slowdown.register()  # vLLM loads its plugins in every process, sometimes twice
    for name, fn in originals.items():
        patched = getattr(EngineCore, name)
        assert patched.__llm_latency_slowdown__ == 0.2 and patched.__wrapped__ is fn


def test_the_plugin_is_registered_with_vllm() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "llm_latency_slowdown"]
    assert ep.load() is slowdown.register


def test_a_sweep_refuses_a_bad_slowdown_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(slowdown.ENV, "20%")
    result = CliRunner().invoke(app, ["sweep", "--out", str(tmp_path / "r"), "--text-tokens", "64"])
    assert result.exit_code == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and slowdown.ENV in lines[0] and "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "r").exists()
