#!/usr/bin/env bash
# CUDA checks for a GPU machine whose python3 already holds a CUDA torch and transformers (nothing is installed):
# the CUDA tests, then bench/speed.py on the GPU with random-weight models of SmolLM2-135M's shape (extra
# arguments go to it, e.g. --large). Logs go to $OUT (or /tmp/gpu_check).
#   bash scripts/gpu_check.sh [--large]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 SLIMQUANT_CACHE=${SLIMQUANT_CACHE:-/tmp/slimquant_cache}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
python3 -m pytest -q -p no:cacheprovider tests/cuda 2>&1 | tee "$out/tests.log"
tests=$?
python3 bench/speed.py --device cuda --random --no-llama-cpp "$@" 2>&1 | tee "$out/speed.log"
exit $(( tests || $? ))
