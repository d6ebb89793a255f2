"""Compute kernels: int8 GEMM and quantize ops (pure-torch reference + fast paths)."""

from slimquant.kernels.int8_ops import int8_mm, int8_mm_packed, pack_weight, quantize_per_token, quantize_static

__all__ = ["int8_mm", "int8_mm_packed", "pack_weight", "quantize_per_token", "quantize_static"]
