#!/usr/bin/env bash
# CUDA checks for a GPU machine whose python3 already holds a CUDA torch and transformers (nothing is installed):
# the CUDA tests, then bench/speed.py on the GPU with random-weight models of SmolLM2-135M's shape (CUDA graphs,
# then eager, then with SLIMQUANT_CUDA_FUSED_INT8=1), then of Qwen2.5-1.5B's shape unless --no-large.
# Logs go to $OUT (or /tmp/gpu_check).
#   bash scripts/gpu_check.sh [--no-large]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 SLIMQUANT_CACHE=${SLIMQUANT_CACHE:-/tmp/slimquant_cache}
speed() { python3 bench/speed.py --device cuda --no-llama-cpp "$@"; }
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
python3 -m pytest -q -p no:cacheprovider tests/cuda 2>&1 | tee "$out/tests.log"
status=$?
speed --random 2>&1 | tee "$out/speed.log" || status=1
speed --random --enforce-eager --no-transformers 2>&1 | tee "$out/speed_eager.log" || status=1
# the one-kernel int8 linears (opt-in until measured): compare their rows with speed.log's
SLIMQUANT_CUDA_FUSED_INT8=1 speed --random --no-transformers 2>&1 | tee "$out/speed_fused.log" || status=1
if [[ "${1:-}" != "--no-large" ]]; then
  speed --only-large --decode-tokens 32 --streams 8 --prompt-len 256 2>&1 | tee "$out/speed_large.log" || status=1
fi
exit $status
