"""Scheduling policies at arrival: the contract between whoever drives an engine and whoever decides.

A driver (the harness's replay loop) calls `ArrivalPolicy.decide` when a request arrives, with what its client
declared (contract/request.py `Declared`: never the true output length) and what the engine holds at that moment;
the policy answers the request's priority (vLLM's priority policy: lower runs first) and whether to admit it at all.
A rejected request is answered as rejected and recorded, never lost.

Policies that need a trained model live with the model (the estimator registers them under the entry-point group
`ENTRY_POINT_GROUP` in pyproject.toml), so the harness finds them by name without importing the estimator: the two
halves still meet only through files and this contract. Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

from contract.request import Declared

ENTRY_POINT_GROUP = "llm_latency_profiler.policies"


class PolicyError(ValueError):
    """A policy that cannot be built from what it was given (one line)."""


@dataclass(frozen=True)
class Held:
    """A request the engine already holds at the decision: admitted, not finished. `request`: what its client
    declared (never the true output length); `arrived_s_ago`: seconds since it arrived; `computed_tokens`: prompt
    tokens already in the KV cache (0 while it waits); `outputs`: tokens it has returned; `running`: scheduled at
    least once (else still waiting)."""

    request: Declared
    priority: int
    arrived_s_ago: float
    computed_tokens: int
    outputs: int
    running: bool


@dataclass(frozen=True)
class Decision:
    priority: int = 0
    admit: bool = True
    reason: str = ""  # why a request was rejected (e.g. the predicted TTFT against its SLO)


class ArrivalPolicy(Protocol):
    """`name` is recorded with the run. `start` is called once the engine runs, with its settings as read back
    (`max_num_seqs`, `max_num_batched_tokens`, `block_size`, `num_gpu_blocks`, `max_model_len`, ...) and the
    run's config (`tier`, `top_k`, `blocks`, ...); `decide` at every arrival."""

    name: str

    def start(self, engine: Mapping[str, Any], config: Mapping[str, Any]) -> None: ...

    def decide(self, request: Declared, held: Sequence[Held]) -> Decision: ...


def registered() -> list[str]:
    """The names of the policies installed under ENTRY_POINT_GROUP."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_registered(name: str, options: Mapping[str, Any]) -> ArrivalPolicy:
    """Build the installed policy `name` from `options` (its factory's keyword arguments)."""
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        have = ", ".join(registered()) or "none: is the project installed (pip install -e .)?"
        raise PolicyError(f"no installed policy {name!r} (installed: {have})")
    try:
        policy: ArrivalPolicy = found[0].load()(**options)
    except Exception as e:  # the policy's own errors (a missing model, a bad SLO) become one line here
        raise PolicyError(f"policy {name}: {e}") from e
    return policy
