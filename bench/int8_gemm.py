"""Micro-benchmark: our native int8 linear (each build the CPU runs) against torch's float and int8 GEMMs.

For the linear shapes (K -> N) of SmolLM2-135M (or --shapes qwen2.5-7b) and M tokens, times y = x @ W^T:
- torch bf16 F.linear (oneDNN; AMX-BF16 or AVX512-BF16 where the CPU has them) and fp32 F.linear (BLAS);
- torch._int_mm (int8 x int8 -> int32);
- ours: sq_dynamic_linear (fp32 x in, per-token quantization fused, fp32 y out) from each ISA build.
Each cell is the median of --repeats timings (microseconds per call), each the mean of enough calls to fill
about --min-ms; "x" columns are the time relative to bf16 F.linear measured in the same run (below 1 = faster).

    .venv/bin/python bench/int8_gemm.py [--threads 2] [--repeats 15]
    .venv/bin/python bench/int8_gemm.py --shapes qwen2.5-7b --no-fp32 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from slimquant.backends.native_ops import NativeOps
from slimquant.kernels import native

SHAPES = {  # (K, N, name) of each model's linears
    "smollm2": [(576, 960, "qkv"), (576, 3072, "gate_up"), (1536, 576, "down")],
    "qwen2.5-7b": [(3584, 4608, "qkv"), (3584, 3584, "o"), (3584, 37888, "gate_up"), (18944, 3584, "down")],
}
TOKENS = [1, 16, 512]


def _time_us(fn, repeats: int, min_ms: float) -> float:
    """Median over repeats of the mean time of one call, in microseconds."""
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_ms / 1e3 or calls < 2:
        fn()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    inner = max(1, int(min_ms / 1e3 / per_call))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(samples)


def _ours(lib, x: torch.Tensor, packed: torch.Tensor, w_s: torch.Tensor):
    (m, k), ldx, (n, kp) = x.shape, x.stride(0), packed.shape
    y = torch.empty(m, n, dtype=torch.float32)

    def run():  # holds packed (not just its address): a freed weight of many MB is unmapped at once
        lib.sq_dynamic_linear(x.data_ptr(), m, k, ldx, packed.data_ptr(), n, kp, w_s.data_ptr(), None, y.data_ptr())

    return run


def _int_mm_usable(x_q: torch.Tensor, w_t: torch.Tensor) -> bool:
    try:
        torch._int_mm(x_q, w_t)
        return True
    except RuntimeError:
        return False


def _candidates(m: int, k: int, n: int, libs: dict) -> dict:
    """name -> a zero-argument callable computing the [m, n] product once."""
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    xb, wb = x.bfloat16(), w.bfloat16()
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w_s = torch.rand(n, generator=g) / 50
    runs = {"bf16 F.linear": lambda: F.linear(xb, wb), "fp32 F.linear": lambda: F.linear(x, w)}
    w_qt = w_q.t()
    runs["torch._int_mm"] = (lambda: torch._int_mm(x_q, w_qt)) if _int_mm_usable(x_q, w_qt) else None
    for name, lib in libs.items():
        runs[f"ours {name}"] = _ours(lib, x, NativeOps(lib).pack_weight(w_q), w_s)  # each build's layout
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--min-ms", type=float, default=20.0, help="time per repeat")
    parser.add_argument("--shapes", choices=SHAPES, default="smollm2", help="whose linears [%(default)s]")
    parser.add_argument("--no-fp32", action="store_true", help="leave out fp32 F.linear (slow at 7B shapes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    libs = {}
    if native.available():
        libs = {isa: native.load(isa) for isa in native.isas_here()}
    isa = native.best_isa()
    print(f"threads={args.threads} repeats={args.repeats} native default isa={isa} torch={torch.__version__}")
    print("ours = sq_dynamic_linear: fp32 in, per-token int8 quantization fused, fp32 out; x = time / bf16 time")
    header = None
    for k, n, name in SHAPES[args.shapes]:
        for m in TOKENS:
            runs = _candidates(m, k, n, libs)
            if args.no_fp32:
                del runs["fp32 F.linear"]
            us = {label: _time_us(fn, args.repeats, args.min_ms) for label, fn in runs.items() if fn is not None}
            if header is None:
                header = list(runs)
                cols = "".join(f"{label:>22}" for label in header)
                print(f"{'shape':<18}{'M':>5}{cols}")
            base = us["bf16 F.linear"]
            cells = "".join(
                f"{us[label]:>13.1f}us {us[label] / base:>5.2f}x" if label in us else f"{'n/a':>22}" for label in header
            )
            print(f"{f'{name} {k}->{n}':<18}{m:>5}{cells}", flush=True)


if __name__ == "__main__":
    main()
