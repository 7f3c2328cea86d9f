"""The estimator's own exception: every user-facing failure is one of these, with a one-line message."""

from __future__ import annotations


class EstimatorError(Exception):
    """A problem with the user's input, data or model files, reported as one line (CLI exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def one_line_validation_error(exc: Exception) -> str:
    """Turn a pydantic ValidationError (or anything else) into one readable line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for err in errors():
            loc = ".".join(str(p) for p in err.get("loc", ())) or "value"
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        if parts:
            return "; ".join(parts)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
