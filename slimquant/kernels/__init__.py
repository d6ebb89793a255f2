"""Compute kernels: int8 GEMM with fused (de)quantization, fused decoder layers; pure-torch + native CPU paths."""

from slimquant.kernels.decoder_ops import (
    DecoderLayerPlan,
    DecoderStackPlan,
    LinearForm,
    ModelEnds,
    decoder_layer_plan,
    decoder_model,
    fp32_copy,
)
from slimquant.kernels.float_ops import float_linear, pack_float_weight
from slimquant.kernels.int8_ops import (
    dynamic_linear,
    int8_mm,
    int8_mm_packed,
    pack_weight,
    quantize_per_token,
    quantize_static,
    static_linear,
)
from slimquant.kernels.layer_ops import add_rms_norm, cuda_layer_ops, decode_attention, rms_norm_heads, silu_and_mul

__all__ = [
    "DecoderLayerPlan",
    "DecoderStackPlan",
    "LinearForm",
    "ModelEnds",
    "add_rms_norm",
    "cuda_layer_ops",
    "decode_attention",
    "decoder_layer_plan",
    "decoder_model",
    "dynamic_linear",
    "float_linear",
    "fp32_copy",
    "int8_mm",
    "int8_mm_packed",
    "pack_float_weight",
    "pack_weight",
    "quantize_per_token",
    "quantize_static",
    "rms_norm_heads",
    "silu_and_mul",
    "static_linear",
]
