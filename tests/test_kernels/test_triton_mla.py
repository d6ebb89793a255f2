"""The paged MLA decode kernel (kernels/cuda_mla.py) against TorchOps.mla_decode (gather + SDPA), run by Triton's
interpreter on the CPU (tests/gpu runs it compiled). fp32 agrees to float rounding; 16-bit dtypes to their
rounding of the softmax weights (as flash attention)."""

from __future__ import annotations

import pytest
import torch

from slimquant.backends.torch_ops import TorchOps
from slimquant.layers.context import ForwardContext

if torch.cuda.is_available():
    pytest.skip("tests/gpu runs these kernels compiled", allow_module_level=True)
pytest.importorskip("triton")
from slimquant.kernels import cuda_mla  # noqa: E402

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def mla_inputs(b: int, nh: int, rank: int, rope: int, bs: int, lens: list[int], dtype: torch.dtype, seed: int = 0):
    """(q [B, NH, R + P], cache [NB, BS, R + P], decode ForwardContext): tables of shuffled blocks, -1 padded."""
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // bs) for n in lens) + 1  # one spare column: padding
    blocks = torch.randperm(b * width, generator=gen).view(b, width).int()
    for i, n in enumerate(lens):
        blocks[i, -(-n // bs) :] = -1
    cache = torch.randn(b * width, bs, rank + rope, generator=gen).to(dtype)
    q = torch.randn(b, nh, rank + rope, generator=gen).to(dtype)
    ctx = ForwardContext([1] * b, list(lens), torch.zeros(b, dtype=torch.int64), blocks, bs)
    return q, cache, ctx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "b,nh,rank,rope,bs,lens",
    [
        (1, 16, 32, 16, 16, [37]),
        (3, 4, 64, 16, 4, [1, 9, 30]),
        (2, 32, 32, 32, 16, [16, 70]),
        (2, 8, 16, 16, 8, [5, 1]),
    ],
)
def test_mla_decode_matches_gather_and_sdpa(b, nh, rank, rope, bs, lens, dtype):
    q, cache, ctx = mla_inputs(b, nh, rank, rope, bs, lens, dtype, seed=b + nh)
    scale = (rank + rope) ** -0.5
    want = TorchOps().mla_decode(q, cache, ctx, scale, rank).float()
    for splits in (1, 3):  # one pass, and the table in parts combined after (flash-decoding)
        got = cuda_mla.mla_decode(q, cache, ctx.block_tables, ctx.lens_on_device, scale, rank, splits).float()
        torch.testing.assert_close(got, want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_padding_blocks_and_longer_tables_change_nothing():
    """A table wider than the context (a CUDA graph's bucket) and garbage in the blocks past each length."""
    q, cache, ctx = mla_inputs(2, 16, 32, 16, 4, [6, 11], torch.float32, seed=5)
    scale = 0.2
    want = cuda_mla.mla_decode(q, cache, ctx.block_tables, ctx.lens_on_device, scale, 32)
    # [B, W + 5]: the columns past each length name other sequences' blocks
    wide = torch.cat([ctx.block_tables.clamp(min=0), torch.zeros(2, 5, dtype=torch.int32)], dim=1)
    got = cuda_mla.mla_decode(q, cache, wide, ctx.lens_on_device, scale, 32, splits=2)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2", "glm4_moe_lite"])
def test_deepseek_on_the_mla_kernel_matches_gather_and_sdpa(tiny_model, monkeypatch, arch):
    """A bf16 DeepSeek on the cuda-triton ops (a prefill chunk, then decode steps of two sequences): decode attention
    through the kernel gives the logits of TorchOps' gather and SDPA on the same ops otherwise."""
    from slimquant.backends.base import Backend
    from slimquant.backends.triton_ops import TritonOps
    from slimquant.models import loader
    from tests.models.paged import PROMPT, PagedRunner, assert_close

    src = tiny_model(arch, qk_rope_head_dim=16)  # the kernel's tiles: R and P powers of two of 16 or more

    def logits() -> torch.Tensor:
        with monkeypatch.context() as patch:
            patch.setattr(loader, "select_backend", lambda *args: Backend(TritonOps()))
            runner = PagedRunner(loader.load_model(str(src), dtype=torch.bfloat16).model, torch.bfloat16)
        steps = [runner.step({0: PROMPT[:7], 1: PROMPT[3:5]})]
        steps += [runner.step({0: [t], 1: [t + 1]}) for t in PROMPT[7:]]
        return torch.cat(steps).float()

    calls = []
    monkeypatch.setattr(cuda_mla, "mla_decode", lambda *a, _k=cuda_mla.mla_decode: calls.append(1) or _k(*a))
    got = logits()
    layers = 2  # tiny_model's
    assert len(calls) == len(PROMPT[7:]) * layers  # every decode step's every layer
    monkeypatch.setattr(TritonOps, "mla_decode", TorchOps.mla_decode)
    assert_close(got, logits(), rel=2e-2)  # bf16: about one ulp of the largest logit
