"""Paged decode attention on an NVIDIA GPU at Qwen2.5-7B's heads: flash-decoding's split block table against one
pass per sequence and KV head, in one run.

For B sequences of one query token each over a context of C cached tokens (28 query heads, 4 KV heads of 128,
16-token blocks, bf16), the median time (triton.testing.do_bench) of kernels/cuda_layers.paged_decode_attention
with the block table in one part (one program per sequence and KV head: 4 programs for one stream) and in
decode_splits' parts (flash-decoding, as vLLM's paged attention v2). "x": one pass's time / split's. "bw": the K and V
bytes read / time against a device copy's bandwidth measured in the same run. Decode of one stream at long contexts
is where one pass leaves the GPU idle.

    python bench/cuda_attention.py [--batches 1,8,64] [--contexts 512,4096,32768]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cuda_linear import _ms, device_header  # noqa: E402

NH, KVH, D, BS = 28, 4, 128, 16  # Qwen2.5-7B's heads; slimquant's default block size


def times(b: int, context: int, device: str = "cuda") -> tuple[float, float, int, int]:
    """(ms in one pass, ms in splits, splits, K and V bytes read) of one decode step's attention."""
    from slimquant.kernels import cuda_layers

    w = -(-context // BS)  # blocks per sequence
    caches = [torch.randn(b * w, BS, KVH, D, device=device, dtype=torch.bfloat16) for _ in range(2)]
    tables = torch.randperm(b * w, device=device, dtype=torch.int32).view(b, w)  # [B, W]
    lens = torch.full((b,), context, dtype=torch.int32, device=device)
    q = torch.randn(b, NH, D, device=device, dtype=torch.bfloat16)

    def run(splits: int | None):
        return lambda: cuda_layers.paged_decode_attention(q, *caches, tables, lens, D**-0.5, splits)

    splits, _ = cuda_layers.table_parts(w, cuda_layers.decode_splits(b, KVH, w))  # what run(None) launches
    return _ms(run(1)), _ms(run(None)), splits, 2 * b * context * KVH * D * 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,64", help="comma-separated sequences per step [%(default)s]")
    p.add_argument("--contexts", default="512,4096,32768", help="comma-separated cached tokens [%(default)s]")
    args = p.parse_args()
    bw = device_header()
    print(f"{'B':>4}{'context':>9}{'one pass':>11}{'bw':>6}{'splits':>8}{'split':>10}{'bw':>6}{'x':>8}")
    for b in (int(v) for v in args.batches.split(",")):
        for context in (int(v) for v in args.contexts.split(",")):
            one, split, n, read = times(b, context)
            print(
                f"{b:>4}{context:>9}{one * 1e3:>11.1f}{read / (one / 1e3) / bw:>6.0%}{n:>8}{split * 1e3:>10.1f}"
                f"{read / (split / 1e3) / bw:>6.0%}{one / split:>7.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
