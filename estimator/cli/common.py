"""What every `estimate` command shares: spec validation and the one-line error on bad input (exit code 2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from estimator.errors import EstimatorError, one_line_validation_error

S = TypeVar("S", bound=BaseModel)
T = TypeVar("T")


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def build_spec(cls: type[S], **values: Any) -> S:
    """Validate a spec; a validation problem becomes an EstimatorError with one line."""
    try:
        return cls(**values)
    except ValidationError as exc:
        raise EstimatorError(one_line_validation_error(exc)) from exc


def run_command(fn: Callable[[], T]) -> T:
    """Call `fn`, turning EstimatorError into a one-line error and exit code 2."""
    try:
        return fn()
    except EstimatorError as exc:
        raise fail(str(exc)) from None
