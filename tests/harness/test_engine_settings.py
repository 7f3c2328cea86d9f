"""What the harness asks of vLLM, checked without an engine: sampling as served."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import resolve_spec
from harness.engine import EngineSettings
from harness.spec import build_spec
from harness.sweep import SweepOptions, _engine_settings, plan_sweep

PRESET = Path(__file__).resolve().parents[2] / "harness" / "presets" / "cpu-tiny"


def _settings(**kw: object) -> EngineSettings:
    return EngineSettings(model_name="m", model_path=str(PRESET), device="cpu", block_size=32, max_model_len=256, **kw)


def test_no_sampling_seed_unless_asked() -> None:
    params = _settings().sampling_params(8, {"top_k": 50})
    assert params == {"max_tokens": 8, "ignore_eos": True, "detokenize": False, "top_k": 50}
    assert _settings(sampling_seed=7).sampling_params(8)["seed"] == 7
    assert "seed" not in _settings().engine_args()  # the engine's own seed stays vLLM's default


def test_vllm_sampling_params_get_no_seed() -> None:
    vllm = pytest.importorskip("vllm")
    assert vllm.SamplingParams(**_settings().sampling_params(4)).seed is None
    assert vllm.SamplingParams(**_settings(sampling_seed=3).sampling_params(4)).seed == 3


def test_sampling_seed_flag_reaches_the_spec_and_the_engine(tmp_path: Path) -> None:
    spec = resolve_spec(None, None, {"sampling_seed": 11, "tier": [0], "blocks": [32]})
    assert spec.sampling_seed == 11 and spec.model_dump(mode="json")["sampling_seed"] == 11  # manifest["spec"]
    plan = plan_sweep(spec)
    assert _engine_settings(plan, plan.points[0], SweepOptions()).sampling_seed == 11
    default = plan_sweep(build_spec({"axes": {"tier": [0], "blocks": [32]}}))
    assert default.spec.sampling_seed is None
    assert _engine_settings(default, default.points[0], SweepOptions()).sampling_params(4).get("seed") is None
    # the prompt choice stays seeded by `seed`
    assert resolve_spec(None, None, {"seed": 5}).seed == 5
