"""bf16-held float weights: exact packing, and fp32 results equal to fp32 BLAS up to summation order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimquant.backends.native_ops import NativeOps
from slimquant.kernels import native

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
float_ops = NativeOps(native.load()) if native.available() else None


@needs_native
def test_weights_exact_in_bf16_are_held_as_bf16():
    w = torch.randn(7, 16).bfloat16().float()
    packed = float_ops.pack_float_weight(w)
    assert packed.dtype == torch.bfloat16 and torch.equal(packed.float(), w)


@needs_native
def test_weights_not_exact_in_bf16_stay_fp32():
    w = torch.randn(7, 16) + 1e-4  # fp32 values with more mantissa than bf16
    assert float_ops.pack_float_weight(w) is w
    assert float_ops.pack_float_weight(torch.randn(3, 12).bfloat16().float()).dtype == torch.float32  # K % 8 != 0


FLOAT_SHAPES = [
    (1, 8, 1),
    (1, 40, 7),
    (1, 576, 70),
    (2, 24, 5),
    (3, 576, 37),
    (9, 584, 11),
    (16, 64, 9),
    (17, 40, 6),
    (23, 584, 13),
    (128, 72, 10),
    (129, 40, 6),
]


@needs_native
@pytest.mark.parametrize(("m", "k", "n"), FLOAT_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_float_linear_matches_fp32_blas(m, k, n, with_bias):
    g = torch.Generator().manual_seed(m + k + n)
    w = torch.randn(n, k, generator=g).bfloat16().float()
    x = torch.randn(m, k, generator=g)[:, :k]
    bias = torch.randn(n, generator=g) if with_bias else None
    y = float_ops.float_linear(x, float_ops.pack_float_weight(w), bias)
    ref = x.double() @ w.double().T + (0 if bias is None else bias.double())  # [m, n]
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * k**0.5)
    torch.testing.assert_close(y, F.linear(x, w, bias), rtol=1e-5, atol=1e-5 * k**0.5)


def _bf16_linear_with(lib, x: torch.Tensor, w16: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape[0], w16.shape[0], dtype=torch.float32)
    m, k = x.shape
    lib.sq_bf16_linear(x.data_ptr(), m, k, x.stride(0), w16.data_ptr(), w16.shape[0], None, y.data_ptr())
    return y


@needs_native
@pytest.mark.parametrize("isa", native.ISA_FLAGS)
@pytest.mark.parametrize(("m", "k", "n"), [(1, 576, 37), (3, 40, 70), (9, 584, 23), (16, 64, 41), (70, 72, 9)])
def test_bf16_linear_is_batch_invariant(isa, m, k, n):
    """Each output has the same bits whatever other rows and tokens share the call (decode, 4 x 4 blocks, tails)."""
    if isa not in native.isas_here():
        pytest.skip(f"this CPU cannot run the {isa} build")
    lib = native.load(isa)
    g = torch.Generator().manual_seed(m * 7 + n)
    w16 = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g)
    full = _bf16_linear_with(lib, x, w16)  # [m, n]
    rows = torch.randperm(n, generator=g)[: max(1, n // 3)]  # another row set and order, tails in other places
    for t in (0, m // 2, m - 1):
        assert torch.equal(_bf16_linear_with(lib, x[t : t + 1], w16[rows].contiguous()), full[t, rows][None])
    assert torch.equal(_bf16_linear_with(lib, x[1:], w16), full[1:])
