"""The request: one type from workload file to policy, with what a client declares kept apart from what only the
trace knows.

A client declares its prompt (`text_tokens` of it), a cap on what it may generate (`max_tokens`), optionally a
class label, and when it sends the request. How many tokens the request really generates before its EOS is not
known to anyone at arrival; a workload trace knows it (`output_tokens`), and the engine is told to stop there
(`ignore_eos` with `max_tokens = output_tokens`: the trace's stand-in for an EOS). A scheduling policy is handed a
`Declared`, never a `Request`, so it cannot see the true length; only an oracle that is given the trace can.

Every per-stage record (the harness's request in flight, the replica's request state, a held request at a
policy's decision) holds one of these instead of spelling lengths of its own; `tests/contract` checks that no
class outside this package declares request-length fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

# The field names of request lengths: declared only here (tests/contract/test_one_request_type.py).
LENGTH_FIELDS = ("text_tokens", "prompt_tokens", "new_tokens", "output_tokens", "max_tokens")


@dataclass(frozen=True)
class Declared:
    """What a client declares when it sends a request: all that a scheduler may see of it at arrival.

    `arrival_s`: seconds from the workload's start (negative for a request that arrived before a simulation's
    clock starts); `text_tokens`: prompt tokens; `max_tokens`: the client's cap on generated tokens, which is not
    the true output length; `client_class`: a label the client sends (e.g. `chat`, `code`), or None;
    `priority`: a priority the client (or a workload file) asks for, lower runs first, or None; `prompt`: the
    prompt's text where the workload carries it (the harness cuts it to `text_tokens`)."""

    request_id: str
    arrival_s: float
    text_tokens: int
    max_tokens: int
    client_class: str | None = None
    priority: int | None = None
    prompt: str | None = None


@dataclass(frozen=True)
class Request:
    """One request of a workload: the client's declaration and the true output length (`output_tokens`, known
    only to the trace; the engine generates exactly that many). `index`: its 0-based place in its workload."""

    declared: Declared
    output_tokens: int
    index: int = 0

    def __post_init__(self) -> None:
        if self.output_tokens > self.declared.max_tokens:
            raise ValueError(
                f"request {self.declared.request_id}: output_tokens {self.output_tokens} exceeds its declared "
                f"max_tokens {self.declared.max_tokens}"
            )

    @classmethod
    def make(
        cls,
        request_id: str,
        arrival_s: float,
        text_tokens: int,
        output_tokens: int,
        *,
        max_tokens: int | None = None,
        client_class: str | None = None,
        priority: int | None = None,
        prompt: str | None = None,
        index: int = 0,
    ) -> Request:
        """A request from its fields; `max_tokens` defaults to the true length (a client that asks for exactly
        what it gets, as every workload did before the two were told apart)."""
        cap = int(max_tokens if max_tokens is not None else output_tokens)
        declared = Declared(request_id, float(arrival_s), int(text_tokens), cap, client_class, priority, prompt)
        return cls(declared, int(output_tokens), index)

    @classmethod
    def numbered(cls, index: int, arrival_s: float, text_tokens: int, output_tokens: int, **declared: Any) -> Request:
        """The `index`-th request of a workload, with its id `req-<index>` (as every workload file numbers them)."""
        return cls.make(request_id_of(index), arrival_s, text_tokens, output_tokens, index=index, **declared)

    # what the client declared, read through
    @property
    def request_id(self) -> str:
        return self.declared.request_id

    @property
    def arrival_s(self) -> float:
        return self.declared.arrival_s

    @property
    def text_tokens(self) -> int:
        return self.declared.text_tokens

    @property
    def max_tokens(self) -> int:
        return self.declared.max_tokens

    @property
    def client_class(self) -> str | None:
        return self.declared.client_class

    @property
    def priority(self) -> int | None:
        return self.declared.priority

    @property
    def prompt(self) -> str | None:
        return self.declared.prompt

    def declaring(self, **changes: Any) -> Request:
        """This request with declared fields changed (e.g. `priority=3`, `arrival_s=0.0`, `request_id=...`)."""
        return replace(self, declared=replace(self.declared, **changes))

    def generating(self, output_tokens: int) -> Request:
        """This request with another true output length (its cap raised to it where it was smaller)."""
        cap = max(self.max_tokens, output_tokens)
        return Request(replace(self.declared, max_tokens=cap), output_tokens, self.index)


def request_id_of(index: int) -> str:
    """The id of a workload's `index`-th request (0-based): `req-00000`, `req-00001`, ..."""
    return f"req-{index:05d}"


@dataclass(frozen=True)
class EngineLimits:
    """What an engine's scheduler allows, as read back from a running engine (`effective` in a manifest):
    sequences and tokens per iteration, the KV cache in blocks of `block_size` tokens, the context, and how a long
    prompt is chunked (`enable_chunked_prefill`; `long_prefill_token_threshold`, 0 = no cap per chunk)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_blocks: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    async_scheduling: bool = False  # the next step is scheduled before the last one's outputs are processed

    # the keys of a manifest's read-back engine settings they come from (`num_gpu_blocks` is vLLM's name)
    REQUIRED = ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_gpu_blocks", "max_model_len")

    @classmethod
    def missing(cls, effective: Mapping[str, Any]) -> list[str]:
        """The keys `from_effective` needs that `effective` lacks (or holds as 0/None)."""
        return [k for k in cls.REQUIRED if not effective.get(k)]

    @classmethod
    def from_effective(cls, effective: Mapping[str, Any]) -> EngineLimits:
        """The limits from an engine's read-back settings; KeyError naming the keys that are missing."""
        missing = cls.missing(effective)
        if missing:
            raise KeyError(", ".join(missing))
        e = effective
        return cls(
            max_num_seqs=int(e["max_num_seqs"]),
            max_num_batched_tokens=int(e["max_num_batched_tokens"]),
            block_size=int(e["block_size"]),
            num_blocks=int(e["num_gpu_blocks"]),
            max_model_len=int(e["max_model_len"]),
            enable_chunked_prefill=bool(e.get("enable_chunked_prefill", True)),
            long_prefill_token_threshold=int(e.get("long_prefill_token_threshold") or 0),
            async_scheduling=bool(e.get("async_scheduling") or False),
        )
