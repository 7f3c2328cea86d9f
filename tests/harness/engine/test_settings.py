"""What the harness asks of vLLM, checked without an engine: sampling as served."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli.app import resolve_spec
from harness.drivers.plan import SweepOptions, plan_sweep
from harness.drivers.session import engine_settings
from harness.engine.cpu_dtype import machine_dtype_choice
from harness.engine.settings import EngineSettings
from harness.rundata.spec import SpecError, build_spec

PRESET = Path(__file__).resolve().parents[3] / "harness" / "presets" / "cpu-tiny"


def _settings(**kw: object) -> EngineSettings:
    base: dict[str, object] = {"device": "cpu", "block_size": 32, "longest_prompt": 256}
    return EngineSettings(model_name="m", model_path=str(PRESET), **{**base, **kw})  # type: ignore[arg-type]


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
    assert engine_settings(plan, plan.points[0], SweepOptions()).sampling_seed == 11
    default = plan_sweep(build_spec({"axes": {"tier": [0], "blocks": [32]}}))
    assert default.spec.sampling_seed is None
    assert engine_settings(default, default.points[0], SweepOptions()).sampling_params(4).get("seed") is None
    # the prompt choice stays seeded by `seed`
    assert resolve_spec(None, None, {"seed": 5}).seed == 5


def _by_arg(settings: EngineSettings, budget: int) -> dict[str, dict[str, object]]:
    return {e["arg"]: e for e in settings.exceptions(budget)}


def test_served_defaults_with_listed_exceptions() -> None:
    s = _settings(block_size=None)
    args = s.engine_args(2048)
    for arg in ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "block_size", "seed", "async_scheduling"):
        assert arg not in args, arg  # vLLM's own default
    ex = _by_arg(s, 2048)
    # the CPU's dtype is an exception only where bfloat16 would be emulated (tests/harness/engine/test_cpu_dtype.py)
    emulated = {"dtype"} if not machine_dtype_choice().native_bf16 else set()
    assert set(ex) == {
        "enable_prefix_caching", "kv_cache_memory_bytes", "skip_tokenizer_init", "load_format",
        "enable_logging_iteration_details", *emulated,
    }
    assert all(e["reason"] and args[a] == e["value"] for a, e in ex.items())
    assert args["enable_prefix_caching"] is False and args["load_format"] == "dummy"


def test_token_budget_only_when_the_default_is_too_short() -> None:
    assert "max_num_batched_tokens" not in _by_arg(_settings(longest_prompt=2048), 2048)
    ex = _by_arg(_settings(longest_prompt=4096), 2048)["max_num_batched_tokens"]
    assert ex["value"] == 4096 and "2048" in str(ex["reason"])
    assert _settings(longest_prompt=4096).engine_args(2048)["max_num_batched_tokens"] == 4096


def test_cuda_turns_async_scheduling_off_and_the_users_settings_win() -> None:
    cuda = _settings(device="cuda")
    assert _by_arg(cuda, 8192)["async_scheduling"]["value"] is False
    assert "kv_cache_memory_bytes" not in _by_arg(cuda, 8192)
    mine = _settings(engine_kwargs={"enable_prefix_caching": True, "max_num_batched_tokens": 64}, longest_prompt=4096)
    assert "enable_prefix_caching" not in _by_arg(mine, 2048) and "max_num_batched_tokens" not in _by_arg(mine, 2048)
    assert mine.engine_args(2048)["max_num_batched_tokens"] == 64


def test_max_num_seqs_is_a_spec_value_or_an_axis() -> None:
    plan = plan_sweep(build_spec({"axes": {"tier": [0], "blocks": [32]}}))
    assert "max_num_seqs" not in engine_settings(plan, plan.points[0], SweepOptions()).engine_args(2048)
    plan = plan_sweep(build_spec({"axes": {"tier": [0], "blocks": [32]}, "max_num_seqs": 8}))
    assert engine_settings(plan, plan.points[0], SweepOptions()).engine_args(2048)["max_num_seqs"] == 8
    plan = plan_sweep(
        build_spec({"axes": {"tier": [0], "blocks": [32], "seqs": [1, 8]}, "mapping": {"seqs": "engine:max_num_seqs"}})
    )
    assert {engine_settings(plan, p, SweepOptions()).engine_args(2048)["max_num_seqs"] for p in plan.points} == {1, 8}
    with pytest.raises(SpecError, match="max_num_seqs = 4 contradicts axis 'seqs'"):
        build_spec({"axes": {"seqs": [1, 8]}, "mapping": {"seqs": "engine:max_num_seqs"}, "max_num_seqs": 4})
    with pytest.raises(SpecError, match=r"contradicts \[engine\] max_num_seqs"):
        build_spec({"engine": {"max_num_seqs": 2}, "max_num_seqs": 4})


def test_vllm_serve_token_budget_on_cpu() -> None:
    pytest.importorskip("vllm")
    from harness.engine.settings import default_token_budget

    assert default_token_budget({}) == 2048  # vLLM 0.32 CPU, `vllm serve`
