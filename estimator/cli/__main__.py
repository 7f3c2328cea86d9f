"""`python -m estimator.cli ...`: the same as the `estimate` command."""

from estimator.cli.app import app

app()
