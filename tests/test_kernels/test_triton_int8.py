"""The CUDA int8 kernels (kernels/cuda_int8.py) equal docs/FORMAT.md's math, run by Triton's interpreter on the CPU
(tests/cuda runs them compiled on a GPU). Skipped where Triton is not installed (CI: it ships with CUDA torch)."""

from __future__ import annotations

import os

import pytest
import torch

from slimquant.format import primitives as P

if torch.cuda.is_available():
    pytest.skip("tests/cuda runs these kernels compiled", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: kernels run on CPU tensors (only this file uses it)
pytest.importorskip("triton")
from slimquant.kernels import cuda_int8  # noqa: E402


@pytest.fixture(params=[False, True], ids=["three-kernel", "fused"])
def fused(request) -> bool:
    """Every linear test runs both forms: three kernels, and one (KernelConfig.cuda_fused_int8)."""
    return request.param


SHAPES = [(1, 64, 48), (5, 72, 40), (17, 128, 24), (40, 96, 200), (3, 2048, 16)]  # the last: K over one block


def _inputs(t: int, k: int, n: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(t * 1000 + k + n)
    x = (torch.randn(t, k, generator=gen) * 3).to(dtype)
    x[0, :6] = torch.tensor([0.5, 1.5, -2.5, 0.0, 127.0, -3.5])  # ties of round half to even at scale 1
    w_q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    return x, w_q, gen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,k,n", SHAPES)
def test_dynamic_linear(t, k, n, dtype, fused):
    x, w_q, gen = _inputs(t, k, n, dtype)
    w_s, bias = torch.rand(n, generator=gen) / 100, torch.randn(n, generator=gen).to(dtype)
    x_q, s_t = P.quantize_per_token(x)  # [T, K], [T, 1]
    expected = (P.int8_matmul_reference(x_q, w_q).float() * s_t * w_s + bias.float()).to(dtype)
    assert torch.equal(cuda_int8.dynamic_linear(x, w_q, w_s, bias, dtype, fused=fused), expected)
    no_bias = (P.int8_matmul_reference(x_q, w_q).float() * s_t * w_s).to(dtype)
    assert torch.equal(cuda_int8.dynamic_linear(x, w_q, w_s, None, dtype, fused=fused), no_bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,k,n", SHAPES)
def test_static_linear(t, k, n, dtype, fused):
    from slimquant.backends.torch_ops import quantize_static

    x, w_q, gen = _inputs(t, k, n, dtype)
    inv, off = torch.tensor([0.7], dtype=dtype), torch.tensor([3.0], dtype=dtype)  # in x's dtype, as at runtime
    qbias = torch.randint(-1000, 1000, (n,), dtype=torch.int32, generator=gen)
    deq = torch.rand(n, generator=gen)
    acc = P.int8_matmul_reference(quantize_static(x, inv, off), w_q)
    expected = ((acc + qbias).float() * deq).to(dtype)
    assert torch.equal(cuda_int8.static_linear(x, w_q, inv, off, qbias, deq, dtype, fused=fused), expected)


def test_rows_with_a_stride(fused):
    """A column slice of a wider tensor (as a fused projection's output) is read in place."""
    wide, w_q, gen = _inputs(3, 160, 32, torch.float32)
    x = wide[:, 16:80]  # [3, 64], row stride 160
    w_q, w_s = w_q[:, :64].contiguous(), torch.rand(32, generator=gen)
    x_q, s_t = P.quantize_per_token(x)
    expected = P.int8_matmul_reference(x_q, w_q).float() * s_t * w_s
    assert torch.equal(cuda_int8.dynamic_linear(x, w_q, w_s, None, torch.float32, fused=fused), expected)
