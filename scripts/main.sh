#!/usr/bin/env bash
# The main job on the embedded default: set up (idempotent), sweep the CPU model ladder on a real vLLM engine within
# its 3-minute budget (the engine configs that fit, measured adaptively), analyze it, train the estimator, compare
# feature variants (--quick: what decides the verdict), and write the report. The full grid and the full comparison
# are a study away: profile sweep --study full-grid; estimate compare RUN (no --quick).
# A second run reuses the finished sweep (results/default) and redoes only the quick estimator steps.
#   RUN_NAME=... OUT=... bash scripts/main.sh   to keep several runs apart.
#   WITH_BATCH=1 bash scripts/main.sh           also runs the batch-level job (scripts/batch.sh) and puts it in
#                                               the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh  # the vLLM build for this machine: CUDA where an NVIDIA GPU is seen, else CPU
run_name="${RUN_NAME:-default}"
out="${OUT:-results}"
run="$out/$run_name"
bin=.venv/bin
t0=$SECONDS
"$bin/profile" sweep --out "$out" --name "$run_name"
t_sweep=$((SECONDS - t0))
"$bin/estimate" analyze "$run"
"$bin/estimate" train "$run" --variant tokens --out "models/$run_name-tokens"
"$bin/estimate" compare "$run" --quick
batch_args=()
if [ "${WITH_BATCH:-0}" = 1 ]; then
  OUT="$out" bash scripts/batch.sh
  batch_args=(--batch "$out/batch-default" --batch "$out/replay-light" --batch "$out/replay-heavy")
fi
"$bin/estimate" report "$run" --model "models/$run_name-tokens" --out "reports/$run_name" "${batch_args[@]}"
"$bin/estimate" predict --model "models/$run_name-tokens" --tier 1 --top-k 0 --blocks 32 --text-tokens 512 --new-tokens 128
echo "main job done: results in $run, model in models/$run_name-tokens (sweep ${t_sweep} s, estimator steps $((SECONDS - t0 - t_sweep)) s)"
