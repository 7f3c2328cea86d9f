"""Replay workloads for the harness: the shared format and generator of `contract.workload`, with its problems
raised as the harness's `SpecError` (one line, exit 2 at the CLI)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

from contract import workload as _contract
from contract.workload import KEYS, trace_record, write_trace, write_workload
from contract.workload import LengthDist as _LengthDist
from harness.rundata.spec import SpecError

__all__ = [
    "KEYS",
    "LengthDist",
    "check_context",
    "generate_workload",
    "parse_workload",
    "read_workload",
    "trace_record",
    "write_trace",
    "write_workload",
]

T = TypeVar("T")


@contextmanager
def _as_spec_error() -> Iterator[None]:
    try:
        yield
    except _contract.WorkloadError as e:
        raise SpecError(str(e)) from None


def _spec_errors(fn: Callable[..., T]) -> Callable[..., T]:
    @wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> T:
        with _as_spec_error():
            return fn(*args, **kwargs)

    return wrapped


parse_workload = _spec_errors(_contract.parse_workload)
read_workload = _spec_errors(_contract.read_workload)
check_context = _spec_errors(_contract.check_context)
generate_workload = _spec_errors(_contract.generate_workload)


class LengthDist(_LengthDist):
    """`contract.workload.LengthDist` whose `parse` raises SpecError."""

    @classmethod
    def parse(cls, text: str, name: str) -> _LengthDist:
        with _as_spec_error():
            return _LengthDist.parse(text, name)
