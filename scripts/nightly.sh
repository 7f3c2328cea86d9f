#!/usr/bin/env bash
# The nightly latency regression job: sweep scripts/nightly_spec.toml on a real engine, train the estimator, compare
# with the accepted baseline run, append to the history and write the report (`estimate nightly`).
# Exit codes: 0 no regression (the first night accepts itself as the baseline), 1 regression flagged,
#             2 bad input, 3 the sweep failed or left failed points, 4 the job itself crashed.
#   bash scripts/nightly.sh                       one night (state in nightly/: baseline.json, history.jsonl, ...)
#   bash scripts/nightly.sh --accept              ... and promote tonight's run to baseline
#   bash scripts/nightly.sh --baseline RUN        compare with RUN instead of the accepted baseline
# Environment: NIGHTLY_STATE_DIR (default nightly), NIGHTLY_SPEC (default scripts/nightly_spec.toml),
#   NIGHTLY_PROFILE_ARGS (extra `profile sweep` flags, word-split: e.g. "--gpu 0" on a GPU box, or
#   "--model cpu-base" to measure a slower model under the same labels), NIGHTLY_SETUP (setup.sh extras,
#   default cpu,dev; gpu,dev on a GPU box; "none" skips the set-up).
set -euo pipefail
cd "$(dirname "$0")/.."
setup="${NIGHTLY_SETUP:-cpu,dev}"
if [ "$setup" != none ]; then
  bash scripts/setup.sh "$setup" >&2
fi
args=(--spec "${NIGHTLY_SPEC:-scripts/nightly_spec.toml}" --state-dir "${NIGHTLY_STATE_DIR:-nightly}")
for a in ${NIGHTLY_PROFILE_ARGS:-}; do
  args+=("--profile-arg=$a")
done
exec .venv/bin/estimate nightly "${args[@]}" "$@"
