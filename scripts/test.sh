#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, slow real-engine tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev  # setup.sh adds the vLLM build for this machine
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest "$@"
