"""`python -m estimator.nightly ...` (what scripts/nightly.sh runs): the `estimate nightly` command on its own."""

import typer

from estimator.cli.extra import nightly

typer.run(nightly)
