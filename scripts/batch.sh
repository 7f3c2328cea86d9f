#!/usr/bin/env bash
# The batch-level job (issue 13) on the embedded default: the batch grid (scripts/batch_spec.toml) on the CPU
# ladder, a training replay (traffic: the iteration model learns from it beside the grid; docs/simulate.md, "What
# the iteration model trains on"), two Poisson replays the model never trains on (light: about one request in
# flight; heavy: most iterations hold >= 4 sequences), the iteration model, the feature-set study and the
# validation.
# Idempotent like main.sh: finished runs are reused (--name), unfinished ones resumed.
#   OUT=... bash scripts/batch.sh        (main.sh runs it when WITH_BATCH=1 and adds it to the report)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu,dev
out="${OUT:-results}"
bin=.venv/bin
replay() {  # name rate count seed: resume an unfinished replay, skip a finished one
  local name=$1
  if [ -f "$out/$name/manifest.json" ]; then
    if grep -q '"status": "complete"' "$out/$name/manifest.json"; then return 0; fi
    "$bin/profile" replay --resume "$out/$name"
  else
    "$bin/profile" replay --rate "$2" --count "$3" --seed "$4" --tier 1 --blocks 128 --top-k 0 \
      --text-tokens-dist uniform:32:512 --new-tokens-dist uniform:8:64 --out "$out" --name "$name"
  fi
}
"$bin/profile" sweep --spec scripts/batch_spec.toml --out "$out" --name batch-default
replay replay-train 6 80 3
replay replay-light 2 40 1
replay replay-heavy 20 80 2
"$bin/estimate" train "$out/batch-default" "$out/replay-train" --target iteration --out models/batch-iteration
"$bin/estimate" batch "$out/batch-default"
"$bin/estimate" validate "$out/replay-light" --model models/batch-iteration
"$bin/estimate" validate "$out/replay-heavy" --model models/batch-iteration
echo "batch job done: grid in $out/batch-default, replays in $out/replay-light and $out/replay-heavy, model in models/batch-iteration"
