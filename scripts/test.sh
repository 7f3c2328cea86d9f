#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, slow real-engine tests included.
# Two phases: the tests that compare real measurements (marked `alone`, see tests/conftest.py) with the machine to
# themselves, then the rest two at a time. An engine start is mostly single-threaded imports in its three
# processes, so two of them at once use both cores.
# Extra arguments go to both phases (e.g. -q, -x, -k name); a phase with no test selected is not a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,ray,serve,serve-study  # setup.sh adds the build for this machine; the extras' tests run in CI too
.venv/bin/python -m ruff check .
.venv/bin/python -m mypy contract harness estimator scripts  # types: a renamed field fails here, not mid-run
workers="${TEST_WORKERS:-2}"
phase() {  # pytest, with exit 5 (nothing collected) counted as a pass
  local rc=0
  .venv/bin/python -m pytest "$@" || rc=$?
  [ "$rc" -eq 5 ] && rc=0
  return "$rc"
}
rc=0
phase -m alone --durations=10 "$@" || rc=$?
phase -m "not alone" -n "$workers" --dist loadfile --durations=25 "$@" || rc=$?  # the slowest: CI's time
exit "$rc"
