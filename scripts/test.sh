#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, slow real-engine tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu,dev
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest "$@"
