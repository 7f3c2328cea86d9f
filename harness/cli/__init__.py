"""The `profile` command (typer): parse flags, call a driver, print. `python -m harness.cli` runs it too."""
