"""Paged decode attention on an NVIDIA GPU at Qwen2.5-7B's heads: flash-decoding's split block table against one
pass per sequence and KV head, in one run.

For B sequences of one query token each over a context of C cached tokens (28 query heads, 4 KV heads of 128,
16-token blocks, bf16), the median time (triton.testing.do_bench) of kernels/cuda_layers.paged_decode_attention
with the block table in one part (one program per sequence and KV head: 4 programs for one stream) and in
decode_splits' parts (flash-decoding, as vLLM's paged attention v2). "x": one pass's time / split's. "bw": the K and V
bytes read / time against a device copy's bandwidth measured in the same run. Decode of one stream at long contexts
is where one pass leaves the GPU idle.

A second table times DeepSeek's MLA decode (kv_b_proj absorbed: one 512 + 64 latent "head" per token, 16 or 128
query heads) with kernels/cuda_mla.py against TorchOps.mla_decode, the gather of each sequence's latents and SDPA
over the copy that it replaces ("x": torch's time / the kernel's).

    python bench/cuda_attention.py [--batches 1,8,64] [--contexts 512,4096,32768] [--mla-heads 16,128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._options import comma_ints  # noqa: E402
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


def mla_times(b: int, context: int, nh: int, device: str = "cuda") -> tuple[float, float, int]:
    """(ms of the kernel, ms of TorchOps' gather + SDPA, latent bytes read) of one MLA decode step."""
    from slimquant.backends.torch_ops import TorchOps
    from slimquant.kernels import cuda_mla
    from slimquant.layers.context import ForwardContext

    w = -(-context // BS)
    cache = torch.randn(b * w, BS, 576, device=device, dtype=torch.bfloat16)  # [NB, BS, 512 latent + 64 rope]
    tables = torch.randperm(b * w, device=device, dtype=torch.int32).view(b, w)
    lens = torch.full((b,), context, dtype=torch.int32, device=device)
    q = torch.randn(b, nh, 576, device=device, dtype=torch.bfloat16)
    ctx = ForwardContext([1] * b, [context] * b, torch.zeros(b, dtype=torch.int64, device=device), tables, BS)
    kernel = _ms(lambda: cuda_mla.mla_decode(q, cache, tables, lens, 576**-0.5, 512))
    return kernel, _ms(lambda: TorchOps().mla_decode(q, cache, ctx, 576**-0.5, 512)), b * context * 576 * 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--batches", type=comma_ints, default="1,8,64", help="comma-separated sequences per step [%(default)s]"
    )
    p.add_argument(
        "--contexts", type=comma_ints, default="512,4096,32768", help="comma-separated cached tokens [%(default)s]"
    )
    p.add_argument(
        "--mla-heads", type=comma_ints, default="16,128", help="comma-separated MLA query heads per GPU [%(default)s]"
    )
    args = p.parse_args()
    bw = device_header()
    print(f"{'B':>4}{'context':>9}{'one pass':>11}{'bw':>6}{'splits':>8}{'split':>10}{'bw':>6}{'x':>8}")
    for b in args.batches:
        for context in args.contexts:
            one, split, n, read = times(b, context)
            print(
                f"{b:>4}{context:>9}{one * 1e3:>11.1f}{read / (one / 1e3) / bw:>6.0%}{n:>8}{split * 1e3:>10.1f}"
                f"{read / (split / 1e3) / bw:>6.0%}{one / split:>7.2f}x",
                flush=True,
            )

    print(f"\nMLA decode (bf16 latents of 512 + 64; torch: gather + SDPA)\n{'B':>4}{'context':>9}{'heads':>7}"
          f"{'kernel':>10}{'bw':>6}{'torch':>10}{'x':>8}")  # fmt: skip
    for b in args.batches:
        for context in args.contexts:
            for nh in args.mla_heads:
                kernel, torch_ms, read = mla_times(b, context, nh)
                print(
                    f"{b:>4}{context:>9}{nh:>7}{kernel * 1e3:>10.1f}{read / (kernel / 1e3) / bw:>6.0%}"
                    f"{torch_ms * 1e3:>10.1f}{torch_ms / kernel:>7.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
