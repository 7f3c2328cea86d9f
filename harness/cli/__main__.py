"""`python -m harness.cli ...`: the `profile` command."""

from harness.cli.app import app

app()
