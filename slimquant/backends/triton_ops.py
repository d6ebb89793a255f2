"""The cuda-triton backend's ops: Triton kernels (kernels/cuda_layers.py, kernels/cuda_int8.py) for the norms, the
activation, rope + cache write, decode attention and the int8 linears' quantize / dequantize around cuBLASLt;
TorchOps' definitions for the rest (prefill attention: SDPA; float linears: cuBLAS). Each kernel computes TorchOps'
numbers in its order and precision (tests/cuda: int8 values exact, floats within 2 ulps).

`TRITON_INTERPRET=1` runs the kernels on CPU tensors, which is how CI tests them without a GPU.
"""

from __future__ import annotations

import torch

from slimquant.backends.torch_ops import Rope, TorchOps
from slimquant.distributed.tensor_parallel import SINGLE
from slimquant.layers.context import ForwardContext

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class TritonOps(TorchOps):
    """TorchOps with Triton kernels where the tensors share the model's float dtype (a KV cache in another dtype,
    or weights off cuBLASLt's grid of 8, take TorchOps' definitions)."""

    name = "triton"

    def __init__(self, fused_int8: bool = False):
        from slimquant.kernels import cuda_int8, cuda_layers  # needs Triton: the backend checked it is installed

        self.int8, self.layers, self.fused_int8 = cuda_int8, cuda_layers, fused_int8

    def add_rms_norm(self, x, residual, weight, bias, eps):
        if x.dim() != 2 or not _same_float(x, residual, weight, bias):
            return super().add_rms_norm(x, residual, weight, bias, eps)
        return self.layers.add_rms_norm(x, residual, weight, bias, eps)

    def rms_norm(self, x, weight, bias, eps):
        if x.dim() == 2:
            return self.add_rms_norm(x, None, weight, bias, eps)[0]
        if x.dim() != 3 or not _same_float(x, weight, bias):
            return super().rms_norm(x, weight, bias, eps)
        return self.layers.rms_norm_heads(x, weight, bias, eps)

    def silu_and_mul(self, x):
        if x.dim() != 2 or not _same_float(x):
            return super().silu_and_mul(x)
        return self.layers.silu_and_mul(x)

    def attention(self, q, k, v, rope: Rope, kv_cache, ctx: ForwardContext, scale: float, kv_quant=None):
        """Rope and the cache write in one kernel; decode attention in one kernel; prefill: TorchOps (SDPA). An
        int8 cache runs TorchOps' (no Triton kernel for it yet)."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]  # [NB, BS, KVH, D]
        if kv_quant is not None or not _same_float(q, k, v, k_cache, v_cache, *(rope or ())):
            return super().attention(q, k, v, rope, kv_cache, ctx, scale, kv_quant)
        q, k = self.layers.rope_store(q, k, v, rope, k_cache, v_cache, ctx.slot_mapping)
        if not ctx.is_decode:
            return self.attend(q, k, v, k_cache, v_cache, ctx, scale)
        out = self.layers.paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.lens_on_device, scale)
        return out.reshape(q.shape[0], -1)  # [B, NH, D] -> [T, NH * D]

    def dynamic_linear(self, x, packed, w_scale, bias, out_dtype, tp=SINGLE):
        if tp.size > 1 or not _on_grid(packed):  # the fused kernels cannot reduce across ranks
            return super().dynamic_linear(x, packed, w_scale, bias, out_dtype, tp)
        return self.int8.dynamic_linear(x, packed, w_scale, bias, out_dtype, fused=self.fused_int8)

    def static_linear(self, x, packed, inv_scale, offset, quant_bias, deq_scale, out_dtype, tp=SINGLE):
        if tp.size > 1 or not _on_grid(packed):
            return super().static_linear(x, packed, inv_scale, offset, quant_bias, deq_scale, out_dtype, tp)
        return self.int8.static_linear(
            x, packed, inv_scale, offset, quant_bias, deq_scale, out_dtype, fused=self.fused_int8
        )


def _on_grid(packed: torch.Tensor) -> bool:
    """An int8 weight [N, K] on cuBLASLt's grid of 8 (the three-kernel path's GEMM)."""
    return packed.dtype == torch.int8 and packed.shape[-1] % 8 == 0 and packed.shape[0] % 8 == 0


def _same_float(*ts: torch.Tensor | None) -> bool:
    """Every tensor given (None skipped) has the first one's float dtype and unit column stride."""
    live = [t for t in ts if t is not None]
    return live[0].dtype in _FLOATS and all(t.dtype == live[0].dtype and t.stride(-1) == 1 for t in live)
