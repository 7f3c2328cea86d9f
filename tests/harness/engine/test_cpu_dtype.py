"""The dtype a CPU engine computes in: bfloat16 only where the CPU runs it natively (flags + a matmul probe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from typer.testing import CliRunner

from harness.cli.app import app
from harness.engine import cpu_dtype
from harness.engine.cpu_dtype import DtypeChoice, Probe, choose_cpu_dtype, emulation_warning
from harness.engine.settings import EngineSettings

PRESET = Path(__file__).resolve().parents[3] / "harness" / "presets" / "cpu-tiny"
AVX2 = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}  # the AMD EPYC of docs/vllm-notes.md: no avx512*, no amx
SAPPHIRE = AVX2 | {"avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile"}
EMULATED = Probe("AVX2", "2.13.0+cpu", float32_ms=14.0, bfloat16_ms=423.0)  # the measurement
NATIVE = Probe("AVX512", "2.13.0+cpu", float32_ms=3.1, bfloat16_ms=0.4)


def test_an_avx2_only_cpu_computes_in_float32_and_says_why() -> None:
    choice = choose_cpu_dtype(AVX2, EMULATED)
    assert choice.dtype == "float32" and not choice.native_bf16
    assert "avx512_bf16 / amx_bf16 absent" in choice.reason
    assert "14.0 ms in float32 and 423.0 ms in bfloat16 (30.2x)" in choice.reason
    assert choice.as_dict()["probe"]["bf16_slowdown"] == 30.21


def test_native_bf16_needs_the_flags_torch_and_the_probe_to_agree() -> None:
    assert choose_cpu_dtype(SAPPHIRE, NATIVE).dtype == "bfloat16"
    # AMX on the die, but torch/oneDNN restricted to AVX2 (ATEN_CPU_CAPABILITY=avx2): the flags mislead
    restricted = choose_cpu_dtype(SAPPHIRE, Probe("AVX2", "t", 3.0, 90.0))
    assert restricted.dtype == "float32" and "torch dispatches to AVX2" in restricted.reason
    # flags and ISA say yes, but the probe measured bf16 far slower: the measurement wins
    slow = choose_cpu_dtype(SAPPHIRE, Probe("AVX512", "t", 3.0, 30.0))
    assert slow.dtype == "float32" and "not native here" in slow.reason
    # no probe could run: the flags decide
    assert choose_cpu_dtype(SAPPHIRE, None).dtype == "bfloat16"
    assert choose_cpu_dtype(AVX2, None).dtype == "float32"


def test_the_probe_runs_once_per_machine_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    first = cpu_dtype.cached_probe(AVX2)
    assert first is not None and first.float32_ms > 0 and first.bfloat16_ms > 0
    assert len(list(tmp_path.glob("dtype-probe-*.json"))) == 1
    with mock.patch.object(cpu_dtype, "run_probe", side_effect=AssertionError("probed again")):
        assert cpu_dtype.cached_probe(AVX2) == first
    # another ISA restriction is another machine as far as the probe is concerned
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    with mock.patch.object(cpu_dtype, "run_probe", return_value=EMULATED) as probe:
        assert cpu_dtype.cached_probe(AVX2) == EMULATED
    probe.assert_called_once()


def test_a_cpu_restricted_to_avx2_is_probed_as_one(tmp_path: Path) -> None:
    """The documented knobs make any x86 CPU look AVX2-only to torch and oneDNN; the real probe (in a fresh
    interpreter with that environment) must then choose float32, and find bfloat16 the slower."""
    env = {**os.environ, "HARNESS_CACHE_DIR": str(tmp_path), "ATEN_CPU_CAPABILITY": "avx2",
           "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = "import json; from harness.engine.cpu_dtype import choose_cpu_dtype as c; print(json.dumps(c().as_dict()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=300)
    choice = json.loads(out.stdout.strip().splitlines()[-1])
    assert choice["dtype"] == "float32" and not choice["native_bf16"]
    assert choice["probe"]["isa"] == "AVX2"
    assert choice["probe"]["bfloat16_ms"] > choice["probe"]["float32_ms"]
    assert choice["isa_env"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def _settings(choice: DtypeChoice, **kw: object) -> EngineSettings:
    base = {"device": "cpu", "block_size": 32, "longest_prompt": 256, "cpu_dtype": choice}
    return EngineSettings(model_name="m", model_path=str(PRESET), **{**base, **kw})  # type: ignore[arg-type]


def test_the_choice_is_an_engine_exception_with_its_reason() -> None:
    emulated = choose_cpu_dtype(AVX2, EMULATED)
    exc = {e["arg"]: e for e in _settings(emulated).exceptions(2048)}
    assert exc["dtype"]["value"] == "float32" and exc["dtype"]["reason"] == emulated.reason
    assert _settings(emulated).engine_args(2048)["dtype"] == "float32"
    # native bf16: vLLM's own default (the model's bfloat16) stands, no exception
    assert "dtype" not in {e["arg"] for e in _settings(choose_cpu_dtype(SAPPHIRE, NATIVE)).exceptions(2048)}
    # the user's own dtype is not the harness's exception, and it is what the engine gets
    user = _settings(emulated, engine_kwargs={"dtype": "bfloat16"})
    assert "dtype" not in {e["arg"] for e in user.exceptions(2048)} and user.engine_args(2048)["dtype"] == "bfloat16"
    # a float32 model, or CUDA, is left alone
    for kw in ({"hf_overrides": {"torch_dtype": "float32"}}, {"device": "cuda"}):
        assert "dtype" not in {e["arg"] for e in _settings(emulated, **kw).exceptions(2048)}


def test_an_emulated_override_is_warned_about_with_the_measured_slowdown() -> None:
    emulated = choose_cpu_dtype(AVX2, EMULATED)
    warning = emulation_warning("bfloat16", emulated)
    assert warning is not None and "30.2x slower than float32" in warning
    assert emulation_warning("float32", emulated) is None
    assert emulation_warning("bfloat16", choose_cpu_dtype(SAPPHIRE, NATIVE)) is None
    runner = CliRunner()
    with mock.patch("harness.engine.cpu_dtype.machine_dtype_choice", return_value=emulated):
        result = runner.invoke(app, ["sweep", "--dry-run", "--tier", "0", "--dtype", "bfloat16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "warning: dtype bfloat16 is emulated on this CPU (the probe measured its matmul 30.2x slower" in (
        result.output
    )
