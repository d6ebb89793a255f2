"""One MoE layer's routed experts on an NVIDIA GPU at DeepSeek-V3's shape (256 experts of 7168 -> 2048, 8 per token;
--experts 384 for Kimi-K2's): bf16 experts one at a time (the float path) against W8A8_DYNAMIC experts one at a time
(the CUDA path before kernels/cuda_moe.py) and in two grouped GEMMs (kernels/cuda_moe.py), in one run.

For T tokens routed uniformly at random, the median time (triton.testing.do_bench, launches and host syncs
included, as in an eager step) of RoutedExperts.forward with the cuda-triton backend's ops. "x": time / bf16's.
"bw": the int8 weight bytes of the experts the tokens chose / the grouped time, against a device copy's bandwidth
measured in the same run. "same": the grouped output equals the per-expert one bit for bit.

    python bench/cuda_moe.py [--tokens 1,8,64,512,2048] [--experts 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._options import comma_ints  # noqa: E402
from bench.cuda_linear import _ms, device_header  # noqa: E402

HIDDEN, INTER, TOP_K = 7168, 2048, 8  # DeepSeek-V3 / Kimi-K2's routed experts
PREFIX = "model.layers.3.mlp.experts"


def routed_experts(num_experts: int, int8: bool, ops, device: str = "cuda", hidden=HIDDEN, inter=INTER):
    """A RoutedExperts layer with random weights on device (bf16, or W8A8_DYNAMIC experts) and the given ops."""
    from slimquant.layers.moe import PROJS, RoutedExperts
    from slimquant.layers.quant_config import AscendQuantConfig, QuantConfig

    names = {f"{PREFIX}.{e}.{p}.weight": "W8A8_DYNAMIC" for e in range(num_experts) for p in PROJS}
    quant = AscendQuantConfig(names, torch.bfloat16) if int8 else QuantConfig()
    with torch.device(device):
        layer = RoutedExperts(num_experts, hidden, inter, quant, PREFIX, torch.bfloat16)
    layer.ops = ops
    for name, p in layer.named_parameters():
        if p.dtype == torch.int8:
            p.data.random_(-127, 128)  # a symmetric quantizer's range, as random_models
        elif name.endswith("_offset"):
            p.data.zero_()
        elif name.endswith("_scale"):
            p.data.uniform_(0.5 / 127 / hidden**0.5, 1.5 / 127 / hidden**0.5)
        else:
            p.data.normal_(0, (1 / p.shape[-1]) ** 0.5)
    layer.process_weights_after_loading()
    return layer


def route(t: int, num_experts: int, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights fp32, topk_ids) [T, TOP_K]: distinct experts per token, uniformly at random."""
    ids = torch.rand(t, num_experts, device=device).argsort(dim=-1)[:, :TOP_K]
    return torch.rand(t, TOP_K, device=device).softmax(dim=-1), ids


def measure(t: int, num_experts: int, bf16, int8, loop_ops, grouped_ops) -> tuple[list[float], bool, int]:
    """([bf16 per expert, int8 per expert, int8 grouped] microseconds, grouped == per expert, int8 bytes of the
    experts the T tokens chose)."""
    x = torch.randn(t, HIDDEN, device="cuda").bfloat16()
    weights, ids = route(t, num_experts)
    int8.ops = loop_ops
    looped = int8(x, weights, ids)
    us = [_ms(lambda: bf16(x, weights, ids)) * 1e3, _ms(lambda: int8(x, weights, ids)) * 1e3]
    int8.ops = grouped_ops
    us.append(_ms(lambda: int8(x, weights, ids)) * 1e3)
    return us, torch.equal(int8(x, weights, ids), looped), ids.unique().numel() * 3 * HIDDEN * INTER


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=comma_ints, default="1,8,64,512,2048", help="comma-separated T [%(default)s]")
    p.add_argument("--experts", type=int, default=256, help="routed experts (DeepSeek-V3: 256, Kimi-K2: 384)")
    args = p.parse_args()
    from slimquant.backends.triton_ops import TritonOps

    bw = device_header()
    loop_ops, grouped_ops = TritonOps(), TritonOps()
    loop_ops.grouped_experts = lambda *a, **kw: None  # RoutedExperts runs its experts one at a time
    bf16 = routed_experts(args.experts, False, loop_ops)
    int8 = routed_experts(args.experts, True, grouped_ops)
    print(f"{args.experts} experts of {HIDDEN} -> {INTER}, {TOP_K} per token; times in microseconds (median)")
    print(f"{'T':>5}{'bf16 per expert':>17}{'int8 per expert':>23}{'int8 grouped':>23}{'bw':>6}{'same':>6}")
    for t in args.tokens:
        us, same, read = measure(t, args.experts, bf16, int8, loop_ops, grouped_ops)
        cells = f"{us[0]:>17.1f}" + "".join(f"{v:>15.1f} {v / us[0]:>6.2f}x" for v in us[1:])
        print(f"{t:>5}{cells}{read / (us[2] / 1e6) / bw:>6.0%}{str(same):>6}", flush=True)


if __name__ == "__main__":
    main()
