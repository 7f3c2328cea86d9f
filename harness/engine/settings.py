"""What one engine start asks of vLLM: the model, the engine arguments as `vllm serve` would use them, and each
exception the harness makes to those defaults, with its reason.

vLLM is imported lazily (only `SERVING_CONTEXT` and `default_token_budget` need it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.engine.cpu_dtype import HALF_DTYPES, DtypeChoice, machine_dtype_choice, model_dtype

# A CPU engine's KV cache. vLLM's CPU default reserves gpu_memory_utilization (0.9) of the machine's memory for
# it (about 21 GiB on a 24 GiB box) and refuses to start when less is free; a batch-1 sweep needs a few MiB.
CPU_KV_CACHE_BYTES = 512 << 20


@dataclass
class EngineSettings:
    """What one engine start needs. Lengths in tokens, memory in bytes.

    The engine is configured as vLLM serves (`vllm serve`'s defaults for the model and device) except for the
    entries `exceptions()` lists, each with its reason; `engine_kwargs` (the spec's [engine] table and
    engine-level axes) are the user's own settings and win over both.
    """

    model_name: str
    model_path: str
    device: str
    block_size: int | None  # None: vLLM's default for the device
    longest_prompt: int  # tokens: the token budget must hold it, so that a prefill is one engine step
    mode: str = "multiprocess"
    sampling_seed: int | None = None  # per-request SamplingParams.seed; None: none, as served
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    verbose: bool = False
    gc_guard: bool = True  # keep garbage collection out of timed steps (off only to measure its effect)
    allow_chunked_prefill: bool = False  # a prefill over several iterations is recorded per chunk, not a failure
    cpu_pinning: bool = True  # harness, engine core and compute threads on separate cores (engine/cpu_pinning.py)
    cpu_dtype: DtypeChoice | None = None  # what a CPU computes half precision in; None: this machine's choice

    def model_dtype(self) -> str | None:
        """The dtype the model's config asks for (an hf_overrides entry wins); None without a readable config.json
        (vLLM's start then names the problem)."""
        from harness.rundata.spec import SpecError, model_config

        try:
            return model_dtype({**model_config(self.model_path), **self.hf_overrides})
        except SpecError:
            return None

    def dtype_choice(self) -> DtypeChoice:
        """What this CPU computes a half-precision model in (harness/engine/cpu_dtype.py)."""
        return self.cpu_dtype or machine_dtype_choice()

    def exceptions(self, default_token_budget: int) -> list[dict[str, Any]]:
        """The engine arguments that differ from vLLM's serving defaults, each with why: a list of
        {"arg", "value", "reason"}. `default_token_budget` is vLLM's default max_num_batched_tokens here."""
        out: list[dict[str, Any]] = []

        def add(arg: str, value: Any, reason: str) -> None:
            if arg not in self.engine_kwargs:  # the user's own setting is not the harness's exception
                out.append({"arg": arg, "value": value, "reason": reason})

        add(
            "enable_prefix_caching",
            False,
            "every prompt is measured cold: a prefix-cache hit would skip prefill work (num_cached_tokens is "
            "checked to be 0)",
        )
        if default_token_budget < self.longest_prompt:
            add(
                "max_num_batched_tokens",
                self.longest_prompt,
                f"vLLM's default token budget ({default_token_budget}) is shorter than the longest prompt "
                f"({self.longest_prompt}): chunked prefill would split its prefill over several steps",
            )
        if self.device == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            add(
                "kv_cache_memory_bytes",
                CPU_KV_CACHE_BYTES,
                "vLLM's CPU default reserves 90% of the machine's memory for the KV cache and refuses to start "
                "when less is free; one request at a time needs a few MiB (the KV-cache size does not enter a "
                "batch-1 step's work)",
            )
        asked = self.model_dtype() if self.device == "cpu" else None
        if asked in HALF_DTYPES:
            choice = self.dtype_choice()
            if choice.dtype != asked:
                add("dtype", choice.dtype, choice.reason)
        if self.device == "cuda":
            add(
                "async_scheduling",
                False,
                "async scheduling overlaps one step's scheduling with the previous step's execution: each "
                "timed step() must hold one iteration's work",
            )
        add(
            "skip_tokenizer_init",
            True,
            "prompts are cut by the harness and sent as token ids; outputs are not detokenized (a server "
            "detokenizes in the front end, outside the engine step)",
        )
        if not _has_weights(self.model_path):
            add("load_format", "dummy", "a config-only model: random weights of the real shapes")
        add(
            "enable_logging_iteration_details",
            True,
            "the engine core's own time per iteration (engine_elapsed_ms), to cross-check the harness's timing",
        )
        return out

    def engine_args(self, default_token_budget: int = 1 << 30) -> dict[str, Any]:
        """Keyword arguments for vLLM's EngineArgs: the model, the exceptions, then the user's engine kwargs."""
        args: dict[str, Any] = {"model": self.model_path}
        if self.block_size is not None:
            args["block_size"] = self.block_size
        for e in self.exceptions(default_token_budget):
            args[e["arg"]] = e["value"]
        if self.hf_overrides:
            args["hf_overrides"] = dict(self.hf_overrides)
        args.update(self.engine_kwargs)
        args["trust_remote_code"] = self.trust_remote_code  # only the flag turns it on, never an engine kwarg
        return args

    def sampling_params(self, max_new_tokens: int, sampling: dict[str, Any] | None = None) -> dict[str, Any]:
        """Keyword arguments for one request's SamplingParams: a fixed length, no EOS stop, no detokenizing, and
        a seed only when the spec asks for one."""
        params: dict[str, Any] = {"max_tokens": max_new_tokens, "ignore_eos": True, "detokenize": False}
        if self.sampling_seed is not None:
            params["seed"] = self.sampling_seed
        params.update(sampling or {})
        return params


def SERVING_CONTEXT() -> Any:  # noqa: N802 (a constant that needs vLLM imported)
    """vLLM's usage context of `vllm serve`: its defaults (token budget, max_num_seqs) are the served ones."""
    from vllm.usage.usage_lib import UsageContext

    return UsageContext.OPENAI_API_SERVER


def default_token_budget(engine_kwargs: dict[str, Any]) -> int:
    """vLLM's default max_num_batched_tokens for `vllm serve` on this device (vLLM 0.32: CPU 2048 per
    pipeline x tensor rank, most GPUs 2048, H100/H200 8192, >= 160 GB GPUs 16384)."""
    from vllm.config import SchedulerConfig
    from vllm.engine.arg_utils import EngineArgs

    world = int(engine_kwargs.get("tensor_parallel_size", 1)) * int(engine_kwargs.get("pipeline_parallel_size", 1))
    budgets, _ = EngineArgs.get_batch_defaults(world)
    return int(budgets.get(SERVING_CONTEXT(), SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS))


def _has_weights(model_path: str) -> bool:
    p = Path(model_path)
    return p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("*.bin")))
