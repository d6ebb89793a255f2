"""One linear on an NVIDIA GPU at Llama-3-8B / 70B shapes: bf16 cuBLAS against slimquant's int8 paths, in one run.

For each shape (K -> N) and T tokens, the median time of y = x W^T (triton.testing.do_bench: L2 flushed before each
call, as a model's next layer finds it; launches included, as in an eager step) for
- bf16: F.linear (cuBLAS), the baseline;
- int8 cublas / triton: the activations quantized per token by a kernel, then the GEMM (KernelConfig.cuda_int8_gemm:
  torch._int_mm + a dequantize kernel, or one Triton kernel with the dequantization in its epilogue);
- ... pre-quantized: the GEMM alone, what a linear costs after a norm or SiLU-and-mul that quantized for it;
- int_mm: torch._int_mm alone (no dequantization: the floor of the cublas path).
"x" columns: time / bf16's (issue 21's goals: at most 0.6 for T <= 16, 0.75 for T >= 512). "bw": the best
pre-quantized int8 GEMM's weight bytes / time against a device copy's bandwidth measured in the same run.
--sweep also times a grid of Triton tiles per row and prints the fastest (to tune kernels/cuda_int8.gemm_tiles;
about 30 compiles a row at T <= 16, 32 above).

    python bench/cuda_linear.py [--shapes 8b,70b] [--tokens 1,4,16,64,512,2048] [--sweep]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._options import comma_ints  # noqa: E402
from slimquant.devices import check_device  # noqa: E402

SHAPES = {  # (name, K, N) of each linear of one decoder layer (q/k/v and gate/up fused, as slimquant runs them)
    "8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)],
    "70b": [("qkv", 8192, 10240), ("o", 8192, 8192), ("gate_up", 8192, 57344), ("down", 28672, 8192)],
}
# (block_m, block_n, block_k, splits, warps, stages): decode tiles split K; large T tiles try 3 and 4 pipeline stages
SWEEP_FEW = [(16, bn, bk, s, 4, 3) for bn, bk, s in itertools.product((32, 64, 128), (128, 256, 512), (1, 2, 4, 8))]
SWEEP_MANY = [
    (bm, bn, bk, 1, w, st) for bm, bn, bk, w, st in itertools.product((64, 128), (128, 256), (64, 128), (4, 8), (3, 4))
]


def shape_names(text: str) -> list[str]:
    """'8b,70b' -> ['8b', '70b'], each a key of SHAPES (argparse type)."""
    names = text.split(",")
    if any(n not in SHAPES for n in names):
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(SHAPES)}, comma-separated, not {text!r}")
    return names


def _ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (_ms(lambda: dst.copy_(src)) / 1e3)


def device_header() -> float:
    """Check for a GPU, print the machine and a device copy's bandwidth (bytes/s, returned)."""
    check_device("cuda")
    from slimquant.entrypoints.commands.bench import machine_line

    print(machine_line("cuda"))
    bw = copy_bandwidth()
    print(f"device copy bandwidth: {bw / 1e12:.2f} TB/s; times in microseconds (median)")
    return bw


def candidates(t: int, k: int, n: int) -> dict:
    """name -> a zero-argument callable computing the [t, n] product once."""
    from slimquant.kernels import cuda_int8
    from slimquant.kernels.int8_input import PER_TOKEN

    g = torch.Generator(device="cuda").manual_seed(t + k + n)
    x = torch.randn(t, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).bfloat16()
    w_q = torch.randint(-128, 128, (n, k), device="cuda", generator=g, dtype=torch.int8)
    w_s, bias = torch.rand(n, device="cuda", generator=g) / 50, None
    a = cuda_int8.quantize(x, PER_TOKEN)
    runs = {"bf16": lambda: F.linear(x, w)}
    for gemm in ("cublas", "triton"):
        runs[f"int8 {gemm}"] = lambda gemm=gemm: cuda_int8.dynamic_linear(x, w_q, w_s, bias, gemm)
        runs[f"{gemm} pre-quantized"] = lambda gemm=gemm: cuda_int8.int8_linear(a, w_q, w_s, bias, gemm)
    runs["int_mm"] = lambda: torch._int_mm(a.q, w_q.t())
    return runs


def sweep(t: int, k: int, n: int) -> tuple[float, tuple]:
    """(ms, tiles) of the fastest Triton tiles for the pre-quantized GEMM."""
    from slimquant.kernels import cuda_int8
    from slimquant.kernels.int8_input import PER_TOKEN

    x = torch.randn(t, k, device="cuda").bfloat16()
    w_q = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8)
    w_s, a = torch.rand(n, device="cuda"), cuda_int8.quantize(x, PER_TOKEN)
    best = (float("inf"), ())
    for bm, bn, bk, s, w, st in SWEEP_FEW if t <= 16 else SWEEP_MANY:
        if s * bk * 2 > k:
            continue
        tiles = cuda_int8.GemmTiles(bm, bn, bk, s, w, st)
        try:
            ms = _ms(lambda tiles=tiles: cuda_int8.int8_linear(a, w_q, w_s, None, "triton", tiles))
        except Exception as e:  # a tile the compiler refuses (shared memory): skip it
            print(f"  tiles {tiles}: {type(e).__name__}", file=sys.stderr)
            continue
        best = min(best, (ms, (bm, bn, bk, s, w, st)))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=shape_names, default="8b,70b", help="comma-separated: 8b, 70b [%(default)s]")
    p.add_argument("--tokens", type=comma_ints, default="1,4,16,64,512,2048", help="comma-separated T [%(default)s]")
    p.add_argument("--sweep", action="store_true", help="also find the fastest Triton tiles per row (slow)")
    args = p.parse_args()
    from slimquant.kernels import cuda_int8

    bw = device_header()
    print("x = time / bf16's")
    header = None
    for shape in args.shapes:
        for (name, k, n), t in itertools.product(SHAPES[shape], args.tokens):
            us = {label: _ms(fn) * 1e3 for label, fn in candidates(t, k, n).items()}
            if header is None:
                header = list(us)
                print(f"{'shape':<22}{'T':>5}" + "".join(f"{h:>24}" for h in header) + f"{'bw':>6}{'tiles':>26}")
            base = us["bf16"]
            best = min(us["cublas pre-quantized"], us["triton pre-quantized"])
            cells = "".join(f"{us[h]:>15.1f} {us[h] / base:>6.2f}x" for h in header)
            tiles = cuda_int8.gemm_tiles(t, n, k)
            line = f"{f'{shape} {name} {k}->{n}':<22}{t:>5}{cells}{n * k / (best / 1e6) / bw:>6.0%}"
            line += f"{str(dataclasses.astuple(tiles)):>26}"
            if args.sweep:
                ms, fastest = sweep(t, k, n)
                line += f"  fastest {fastest}: {ms * 1e3:.1f} us ({ms * 1e3 / base:.2f}x)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
