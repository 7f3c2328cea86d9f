"""What a sweep will measure, checked before any engine starts: the expanded grid, its engine-config groups, each
tier's model, and the prompt cutters; with the options that say how to run it.

`plan_sweep` and `prompt_sources` raise SpecError on bad input (a model without `architectures`, lengths past a
model's context, prompt text too short), so a sweep, a replay and a Ray driver all fail before writing anything.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.drivers.batch_points import check_batch_spec
from harness.engine.log import EngineOutput
from harness.rundata.prompts import PromptSource, load_documents, load_tokenizer
from harness.rundata.spec import Point, SpecError, SweepSpec, expand, group_by_engine, model_config, resolve_model

ESTIMATE = {
    # engine start on a 2-core CPU: 23-43 s measured on an AVX-512 EPYC, 36-79 s on an AVX2 one (README): the
    # dry-run plans with the slow end of the warm starts
    "cpu": {"flops": 40e9, "step_overhead_s": 0.002, "engine_start_s": 45.0},
    "cuda": {"flops": 150e12, "step_overhead_s": 0.004, "engine_start_s": 90.0},
}


@dataclass
class SweepOptions:
    """How to run a sweep (not what to measure: that is the spec)."""

    out_root: Path = Path("results")
    resume_dir: Path | None = None
    run_id: str | None = None
    gpu: int | None = None
    fail_fast: bool = False
    lock_clocks_mhz: int | None = None
    verbose: bool = False
    engine_output: EngineOutput | None = None  # where the engine's own output goes (engine.log); None: untouched
    canary: bool = False  # time the CPU canary (harness/engine/canary.py) before the first start and at the end
    command: list[str] = field(default_factory=lambda: list(sys.argv))


@dataclass
class TierModel:
    """A tier's model: name, local path, and the config facts the sweep checks against."""

    tier: int
    name: str
    path: str
    vocab_size: int
    max_context: int
    params: int


@dataclass
class Plan:
    spec: SweepSpec
    points: list[Point]
    groups: list[list[Point]]
    models: dict[int, TierModel]

    def estimated_seconds(self) -> float:
        """A rough duration: engine starts plus model FLOPs at a nominal throughput (for --dry-run)."""
        est = ESTIMATE[self.spec.device]
        total = est["engine_start_s"] * len(self.groups)
        reqs = self.spec.requests_per_point
        for p in self.points:
            m = self.models[int(p.axes["tier"])]
            n, new = p.text_tokens, self.spec.max_new_tokens
            work, runs = n + new, reqs
            if "batch" in p.axes:  # batch points: `reps` episodes of B sequences (+ a joiner)
                work, runs = int(p.axes["batch"]) * (n + new) + int(p.axes.get("batch_join_tokens", 0)), self.spec.reps
            total += runs * (2 * m.params * work / est["flops"] + new * est["step_overhead_s"])
        return total


Reporter = Callable[[str, dict[str, Any]], None]


def _param_count(cfg: dict[str, Any]) -> int:
    h = int(cfg.get("hidden_size", 0))
    layers = int(cfg.get("num_hidden_layers", 0))
    heads = int(cfg.get("num_attention_heads", 1))
    kv = int(cfg.get("num_key_value_heads", heads))
    hd = int(cfg.get("head_dim", h // max(heads, 1)))
    inter = int(cfg.get("intermediate_size", 4 * h))
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter
    return layers * per_layer + int(cfg.get("vocab_size", 0)) * h


def plan_sweep(spec: SweepSpec) -> Plan:
    """Expand the grid and check every point against its model before anything is measured."""
    models: dict[int, TierModel] = {}
    for tier in spec.axes["tier"]:
        name, path = resolve_model(spec.ladder[tier])
        cfg = model_config(path)
        if "architectures" not in cfg:
            raise SpecError(f"{path}/config.json has no 'architectures' entry")
        ctx = int(cfg.get("max_position_embeddings", 2048))
        models[tier] = TierModel(tier, name, path, int(cfg.get("vocab_size", 0)), ctx, _param_count(cfg))
    longest = max(spec.axes["text_tokens"])
    for m in models.values():
        if longest + spec.max_new_tokens > m.max_context:
            raise SpecError(
                f"text_tokens {longest} + max_new_tokens {spec.max_new_tokens} exceeds the context "
                f"of tier {m.tier} ({m.name}: {m.max_context} tokens)"
            )
    check_batch_spec(spec, min(m.max_context for m in models.values()))
    points = expand(spec)
    return Plan(spec, points, group_by_engine(points), models)


def prompt_sources(plan: Plan) -> dict[str, PromptSource]:
    """One prompt cutter per model path, checked before any engine starts.

    Raises SpecError when the prompt text is too short for the longest `text_tokens` (with that model's
    tokenizer) or the tokenizer gives ids outside the model's vocabulary.
    """
    documents = load_documents(plan.spec.prompts)
    longest = max(plan.spec.axes["text_tokens"])
    where = f"prompts file {plan.spec.prompts}" if plan.spec.prompts else "the built-in corpus"
    sources: dict[str, PromptSource] = {}
    for m in plan.models.values():
        if m.path in sources:
            continue
        source = PromptSource(documents, load_tokenizer(m.path), m.vocab_size, plan.spec.seed)
        if source.max_tokens < longest:
            raise SpecError(
                f"prompt text too short: {where} gives at most {source.max_tokens} tokens with "
                f"{source.tokenizer.name} (tier {m.tier}), text_tokens {longest} requested"
            )
        sources[m.path] = source
    return sources
