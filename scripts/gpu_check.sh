#!/usr/bin/env bash
# The CUDA checks of issues 21 and 19, for a GPU machine whose python3 already holds a CUDA torch and transformers
# (nothing is installed), each stage timed, in the order issue 21 needs them (a run cut short keeps the logs of the
# stages that ran); about 6 minutes on an H200 for stages 1-4 (before the DeepSeek benches were added):
#   1. tests/gpu (with issue 19's tensor parallel on CUDA tensors; its NCCL test wants two GPUs) and the kernels'
#      compile test;
#   2. bench/cuda_linear.py: one linear at Llama-3-8B / 70B shapes, bf16 against the int8 paths;
#   3. bench/speed.py: random Qwen2.5-7B-shaped checkpoints, transformers and slimquant bf16, W8A8_DYNAMIC and W8A8
#      with each int8 GEMM (decode of 1 and 16 streams, prefill of 2048 tokens);
#   4. bench/speed.py: the same for SmolLM2-135M's shape (CUDA graphs), unless --quick;
#   5. bench/cuda_attention.py: paged decode attention in one pass against flash-decoding's split table (B 1, 8, 64;
#      contexts 512 to 32,768), and DeepSeek's MLA decode kernel against the gather + SDPA it replaces;
#   6. bench/cuda_moe.py: one DeepSeek-V3 MoE layer's routed experts, bf16 and int8 one expert at a time against
#      int8 grouped;
#   7. with --sweep: the fastest Triton tiles of the 8B linears at T = 1 and 2048 (bench/cuda_linear.py --sweep).
# Each stage has a time limit (a hung one is stopped and said so; the next still runs). Logs go to $OUT (or
# /tmp/gpu_check); the random checkpoints to $SLIMQUANT_CACHE (written once, about 2 minutes, in the background
# during stages 1 and 2).
#   bash scripts/gpu_check.sh [--quick] [--sweep]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 SLIMQUANT_CACHE=${SLIMQUANT_CACHE:-/tmp/slimquant_cache}
quick=0 sweep=0
for arg in "$@"; do
  case $arg in
    --quick) quick=1 ;;
    --sweep) sweep=1 ;;
    *) echo "unknown option $arg; use --quick, --sweep" >&2; exit 2 ;;
  esac
done
status=0
stage() {  # stage NAME LOG LIMIT COMMAND...: run it for LIMIT s at most (a hang must not eat the GPU's minutes),
  # tee its log, time it, remember a failure
  local name=$1 log=$2 limit=$3 start=$SECONDS
  shift 3
  echo "=== $name" | tee "$out/$log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$out/$log"
  local rc=${PIPESTATUS[0]} why=""
  [[ $rc == 124 || $rc == 137 ]] && why=" (stopped at its limit of $limit s)"
  echo "=== $name: rc $rc$why, $((SECONDS - start)) s" | tee -a "$out/$log" "$out/summary.log"
  [[ $rc == 0 ]] || status=1
}
speed=(python3 bench/speed.py --device cuda --no-llama-cpp --cuda-int8-gemm cublas,triton)
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" | tee "$out/summary.log"
# The random checkpoints of stages 3 and 4 are written (CPU and disk, a few minutes) while stages 1 and 2 use the GPU.
start=$SECONDS
timeout -k 10 300 python3 bench/speed.py --random --7b --prepare > "$out/prepare.log" 2>&1 &  # a bounded wait below
prepare=$!
stage "tests" tests.log 240 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_kernels/test_cuda_compile.py
stage "one linear" linear.log 120 python3 bench/cuda_linear.py
wait $prepare
echo "=== random checkpoints written: rc $?, $((SECONDS - start)) s (overlapping stages 1 and 2)" | tee -a "$out/summary.log"
stage "Qwen2.5-7B shape" speed_7b.log 480 "${speed[@]}" --only-7b --decode-tokens 32 --streams 16 --prompt-len 2048
if [[ $quick == 0 ]]; then
  stage "SmolLM2-135M shape" speed_smollm2.log 180 "${speed[@]}" --random --decode-tokens 64
fi
stage "decode attention" attention.log 180 python3 bench/cuda_attention.py
stage "MoE layer" moe.log 120 python3 bench/cuda_moe.py --tokens 1,16,256,2048
if [[ $sweep == 1 ]]; then
  stage "tile sweep" sweep.log 180 python3 bench/cuda_linear.py --shapes 8b --tokens 1,2048 --sweep
fi
exit $status
