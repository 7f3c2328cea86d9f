#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, slow real-engine tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,ray  # setup.sh adds the build for this machine; ray: the Ray tests run in CI too
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest --durations=25 "$@"  # the slowest tests, to keep CI within its time
