"""The `estimate` command line: thin typer commands (parse → one validated spec → one library call → print)."""

from estimator.cli.app import app

__all__ = ["app"]
