"""The cuda-triton backend's ops: Triton kernels (kernels/cuda_layers.py, kernels/cuda_int8.py) for the norms, the
activation, rope + cache write, decode attention, the int8 linears (the norm or SiLU-and-mul before an int8
linear quantizes its output for it; the GEMM: cuBLASLt + a dequantize kernel, or one Triton kernel) and a MoE
layer's int8 experts (kernels/cuda_moe.py: two grouped GEMMs for all experts); TorchOps'
definitions for the rest (prefill attention: SDPA; float linears: cuBLAS). Each kernel computes TorchOps' numbers in
its order and precision (tests/gpu: int8 values exact, floats within 2 ulps).

`TRITON_INTERPRET=1` runs the kernels on CPU tensors, which is how CI tests them without a GPU.
"""

from __future__ import annotations

import torch

from slimquant.backends.torch_ops import Rope, TorchOps, add_in_expert_order
from slimquant.distributed.tensor_parallel import SINGLE
from slimquant.kernels.int8_input import InputQuant, Int8Rows
from slimquant.kernels.int_mm import on_cublas_grid
from slimquant.layers.context import ForwardContext

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class TritonOps(TorchOps):
    """TorchOps with Triton kernels where the tensors share the model's float dtype (a KV cache in another dtype,
    or weights off cuBLASLt's grid of 8, take TorchOps' definitions)."""

    name = "triton"

    def __init__(self, int8_gemm: str = "cublas"):
        """int8_gemm: config.CUDA_INT8_GEMMS (weights off cuBLASLt's grid of 8 take Triton's)."""
        from slimquant.kernels import cuda_int8, cuda_layers, cuda_mla, cuda_moe  # needs Triton: the backend checked

        self.int8, self.layers, self.moe, self.mla = cuda_int8, cuda_layers, cuda_moe, cuda_mla
        self.int8_gemm = int8_gemm

    def pack_weight(self, w_q):
        """int8 [..., N, K] as it is, on any device: the kernels read it so (and TorchOps.int8_mm does)."""
        return w_q

    def add_rms_norm(self, x, residual, weight, bias, eps):
        if x.dim() != 2 or not _same_float(x, residual, weight, bias):
            return super().add_rms_norm(x, residual, weight, bias, eps)
        return self.layers.add_rms_norm(x, residual, weight, bias, eps)

    def add_rms_norm_quant(self, x, residual, weight, bias, eps, quant):
        if quant is None or x.dim() != 2 or not _same_float(x, residual, weight, bias, *_static(quant)):
            return super().add_rms_norm_quant(x, residual, weight, bias, eps, quant)
        return self.layers.add_rms_norm(x, residual, weight, bias, eps, quant)

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

    def silu_and_mul_quant(self, x, quant):
        if quant is None or x.dim() != 2 or not _same_float(x, *_static(quant)):
            return super().silu_and_mul_quant(x, quant)
        return self.layers.silu_and_mul(x, quant)

    def quantize_input(self, x, quant):
        if x.dim() != 2 or not _same_float(x, *_static(quant)):
            return x
        return self.int8.quantize(x, quant)

    def attention(
        self, q, k, v, rope: Rope, kv_cache, ctx: ForwardContext, scale: float, kv_quant=None, out_quant=None
    ):
        """Rope and the cache write in one kernel; decode attention in one kernel, which quantizes its output for a
        static o_proj; prefill: TorchOps (SDPA). An int8 cache runs TorchOps' (no Triton kernel for it yet)."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]  # [NB, BS, KVH, D]
        if kv_quant is not None or not _same_float(q, k, v, k_cache, v_cache, *(rope or ())):
            return super().attention(q, k, v, rope, kv_cache, ctx, scale, kv_quant)
        if rope is not None and rope[0].shape[-1] != q.shape[-1]:  # rope_store turns whole heads: partial rope first
            q, k, rope = self.rotate(q, rope), self.rotate(k, rope), None
        q, k = self.layers.rope_store(q, k, v, rope, k_cache, v_cache, ctx.slot_mapping)
        if not ctx.is_decode:
            return self.attend(q, k, v, k_cache, v_cache, ctx, scale)
        static = out_quant is not None and out_quant.inv_scale is not None and _same_float(q, *_static(out_quant))
        quant = out_quant if static else None  # per token: a row's heads come from several programs
        lens = ctx.lens_on_device
        out = self.layers.paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, lens, scale, quant=quant)
        return out if static else out.reshape(q.shape[0], -1)  # [B, NH, D] -> [T, NH * D]

    def mla_decode(self, q, cache, ctx, scale, rank):
        """The paged MLA decode kernel (kernels/cuda_mla.py) where its tiles fit: R and P powers of two of 16 or
        more, heads 16 or fewer or a multiple of 16; else TorchOps' gather and SDPA."""
        nh, p = q.shape[1], q.shape[2] - rank
        tiles_fit = all(n >= 16 and n & (n - 1) == 0 for n in (rank, p)) and (nh <= 16 or nh % 16 == 0)
        if not tiles_fit or not _same_float(q, cache) or not q.is_contiguous():
            return super().mla_decode(q, cache, ctx, scale, rank)
        return self.mla.mla_decode(q, cache, ctx.block_tables, ctx.lens_on_device, scale, rank)

    def dynamic_linear(self, x, packed, w_scale, bias, out_dtype, tp=SINGLE):
        """x: float [T, K], or Int8Rows from the op before (quantized per token, out_dtype its dtype)."""
        if not isinstance(x, Int8Rows) and (tp.size > 1 or not _runs(x, out_dtype)):  # no reduction across ranks
            return super().dynamic_linear(x, packed, w_scale, bias, out_dtype, tp)
        assert tp.size == 1 and packed.dtype == torch.int8, "only this backend's ops quantize for a linear"
        return self.int8.dynamic_linear(x, packed, w_scale, bias, self._gemm(packed))

    def static_linear(self, x, packed, inv_scale, offset, quant_bias, deq_scale, out_dtype, tp=SINGLE):
        """x: float [T, K], or Int8Rows from the op before (quantized with inv_scale / offset)."""
        if not isinstance(x, Int8Rows) and (tp.size > 1 or not _runs(x, out_dtype, inv_scale, offset)):
            return super().static_linear(x, packed, inv_scale, offset, quant_bias, deq_scale, out_dtype, tp)
        assert tp.size == 1 and packed.dtype == torch.int8, "only this backend's ops quantize for a linear"
        return self.int8.static_linear(x, packed, inv_scale, offset, quant_bias, deq_scale, self._gemm(packed))

    groups_experts = True
    groups_split_experts = True

    def grouped_experts(
        self, x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, first=None, tp=SINGLE, summed=False
    ):
        """All experts' int8 GEMMs in grouped kernels, the routing on the device (kernels/cuda_moe.py); summed:
        their slots added in expert order after them."""
        if w13.dtype != torch.int8 or w2.dtype != torch.int8:
            return None
        if not isinstance(x, Int8Rows) and (x.dim() != 2 or not _same_float(x)):
            return None
        outs = self.moe.routed_experts(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, first, tp=tp)
        return add_in_expert_order(outs, topk_ids) if summed else outs

    def _gemm(self, packed: torch.Tensor) -> str:
        """The configured int8 GEMM; Triton's for a weight [N, K] off cuBLASLt's grid of 8."""
        return self.int8_gemm if on_cublas_grid(packed) else "triton"


def _runs(x: torch.Tensor, out_dtype: torch.dtype, *params: torch.Tensor) -> bool:
    """Whether the int8 kernels take float x [T, K] (their output is in x's dtype)."""
    return x.dim() == 2 and x.dtype == out_dtype and _same_float(x, *params)


def _static(quant: InputQuant) -> tuple[torch.Tensor, ...]:
    """A static quant's (inv_scale, offset), which must share the activations' dtype; () for per token."""
    return () if quant.inv_scale is None else (quant.inv_scale, quant.offset)


def _same_float(*ts: torch.Tensor | None) -> bool:
    """Every tensor given (None skipped) has the first one's float dtype and unit column stride."""
    live = [t for t in ts if t is not None]
    return live[0].dtype in _FLOATS and all(t.dtype == live[0].dtype and t.stride(-1) == 1 for t in live)
