"""Float linears whose weights are held as bf16 and computed in fp32: half the bytes of an fp32 copy, same values.

On CPUs without native bf16 math the engine computes in fp32 (kernels/cpu.py), so a bf16 checkpoint's float
weights (lm_head, embeddings, float-kept linears) would be upcast to 4 bytes each, and decoding reads every
byte once per token. Each bf16 value is exact in fp32, so `pack_float_weight` keeps such weights as bf16 and
`float_linear` multiplies in fp32: the native kernel for a few tokens, fp32 BLAS on an upcast copy for many.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimquant.kernels import native, weight_memory

# Up to this many rows the native kernel runs; above, fp32 BLAS on a temporary fp32 copy. Measured on Zen 4
# (lm_head and MLP shapes): native is 1.3-4x faster from 16 to 128 rows in both builds; at 512, BLAS wins by
# about a fifth on the AVX2 build and loses by a tenth to a third on the AVX-512 one.
NATIVE_MAX_TOKENS = 128
_K_MULTIPLE = 8  # the kernel reads 8 bf16 values at a time


def pack_float_weight(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] as bf16 when the native kernels run, w is fp32 on CPU and every value is exactly a bf16; else w."""
    if w.device.type != "cpu" or w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] % _K_MULTIPLE:
        return w
    if not native.available():
        return w
    w16 = w.bfloat16()
    if not torch.equal(w16.float(), w):
        return w
    return weight_memory.empty(tuple(w16.shape), torch.bfloat16).copy_(w16)  # huge pages where possible


def float_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [T, N] = x [T, K] @ w^T (+ bias) for a weight from pack_float_weight, in x's dtype."""
    if w.dtype == x.dtype or x.device.type != "cpu":
        return F.linear(x, w, bias)
    if w.dtype != torch.bfloat16 or x.dtype != torch.float32 or x.shape[0] > NATIVE_MAX_TOKENS:
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    x = native.rows_contiguous(x)  # [T, K]
    bias = None if bias is None else bias.float().contiguous()
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)  # [T, N]
    native.library().sq_bf16_linear(
        x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), w.data_ptr(), w.shape[0],
        None if bias is None else bias.data_ptr(), y.data_ptr(),
    )  # fmt: skip
    return y
