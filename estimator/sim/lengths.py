"""The output length a scheduler cannot see at arrival, predicted from what a client declares.

A policy is handed a `Declared` request (contract/request.py): its prompt's token count, a `max_tokens` cap that
is not the true length, and an optional `client_class`. `OutputLengths` learns the true output length's
distribution per (class label, prompt-length bucket, cap) from a training trace (a workload file whose
`new_tokens` are the true lengths; the scheduler experiment writes one from a seed disjoint from the seeds it
evaluates) and answers, for a request that has already produced `produced` tokens, the expected total length given
that it is still running (the mean of the training lengths above `produced`) or a quantile of them.

A group with fewer than MIN_GROUP training requests falls back to a coarser one: (class, cap), (class), (cap), then
every request; a training length above the request's cap counts as the cap. Prompt buckets are powers of two (16-31,
32-63, ...). What it can learn is what the declaration carries: where the output does not depend on the prompt and
no class is declared (the `independent` mix), every request gets about the same prediction, and a policy ordering by
predicted latency orders by prompt length.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from contract.request import Declared, Request
from contract.workload import WorkloadError, read_workload
from estimator.errors import EstimatorError

MIN_GROUP = 20  # training requests a group needs before it is used rather than a coarser one
STATS = ("mean", "p50", "p75", "p90")


def prompt_bucket(text_tokens: int) -> int:
    """The power-of-two bucket of a prompt length: floor(log2(text_tokens)) (16-31 -> 4, 32-63 -> 5, ...)."""
    return max(int(text_tokens), 1).bit_length() - 1


@dataclass(frozen=True)
class OutputLengths:
    """Sorted training output lengths per group key (see the module docstring); `stat`: what `predict` answers,
    `mean` (expected total length) or `pNN` (that quantile)."""

    groups: dict[tuple, list[int]]
    stat: str = "mean"
    # predict's answers per (class, prompt bucket, cap, produced): a policy asks again for every held request at
    # every arrival, and the answer depends on nothing else (half of estimate-admit's decision time before)
    _answers: dict[tuple, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def fit(cls, requests: Iterable[Request], stat: str = "mean") -> OutputLengths:
        if stat not in STATS:
            raise EstimatorError(f"output-length statistic {stat!r}: expected one of {', '.join(STATS)}")
        groups: dict[tuple, list[int]] = {}
        for r in requests:
            c, b, cap = r.client_class, prompt_bucket(r.text_tokens), r.max_tokens
            for key in (("cbc", c, b, cap), ("cc", c, cap), ("class", c), ("cap", cap), ("all",)):
                groups.setdefault(key, []).append(r.output_tokens)
        if not groups:
            raise EstimatorError("no training requests to learn output lengths from")
        return cls({k: sorted(v) for k, v in groups.items()}, stat)

    @classmethod
    def from_file(cls, path: str | Path, stat: str = "mean") -> OutputLengths:
        """Learn from a workload file (contract/workload.py format); EstimatorError naming a bad file."""
        try:
            return cls.fit(read_workload(Path(path)), stat)
        except WorkloadError as e:
            raise EstimatorError(f"output-length training trace: {e}") from None

    def forget(self) -> None:
        """Drop the kept answers (`estimate experiment decision-speed --recompute-lengths`: the cost without them)."""
        self._answers.clear()

    def lengths(self, request: Declared) -> Sequence[int]:
        """The training lengths of the finest group with at least MIN_GROUP requests (else every request's)."""
        c, b, cap = request.client_class, prompt_bucket(request.text_tokens), request.max_tokens
        for key in (("cbc", c, b, cap), ("cc", c, cap), ("class", c), ("cap", cap)):
            found = self.groups.get(key)
            if found is not None and len(found) >= MIN_GROUP:
                return found
        return self.groups[("all",)]

    def predict(self, request: Declared, produced: int = 0) -> int:
        """The predicted total output length of a request that has produced `produced` tokens and is still
        running: the group's lengths above `produced`, their mean or quantile, at least `produced + 1` and at most
        the declared cap."""
        cap = request.max_tokens
        key = (request.client_class, prompt_bucket(request.text_tokens), cap, produced)
        known = self._answers.get(key)
        if known is not None:
            return known
        lengths = self.lengths(request)
        rest = [min(n, cap) for n in lengths[bisect.bisect_right(lengths, produced):]]  # none exceeds its cap
        if not rest:
            value = produced + 1
        elif self.stat == "mean":
            value = round(sum(rest) / len(rest))
        else:
            q = int(self.stat[1:]) / 100
            value = rest[min(len(rest) - 1, max(0, math.ceil(q * len(rest)) - 1))]
        answer = max(produced + 1, min(int(value), cap))
        self._answers[key] = answer
        return answer
