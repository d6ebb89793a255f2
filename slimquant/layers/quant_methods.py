"""Linear quant methods, one object per scheme: how a layer holds its weights and computes y = x W^T (+ b).

Every method has three jobs (vLLM's plug-in shape): create_weights registers the parameters the checkpoint
fills, process_weights_after_loading turns them into the backend's runtime form, apply runs the math of
docs/FORMAT.md with the backend's ops (layer.ops).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from slimquant.format.primitives import decode_deq_scale, weight_only_weight
from slimquant.format.schemes import W8A8, W8A8_DYNAMIC, W8A16
from slimquant.format.validation import (
    DEQ_SCALE,
    FLOAT_TENSOR,
    INPUT_SCALE,
    INT8_WEIGHT,
    OFFSET,
    QUANT_BIAS,
    WEIGHT_OFFSET,
    WEIGHT_SCALE,
    TensorRule,
)
from slimquant.kernels.int8_input import PER_TOKEN, InputQuant, Int8Rows

logger = logging.getLogger(__name__)


def add_param(
    layer: nn.Module,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    rule: TensorRule,
    per_shard: bool = False,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Register an empty parameter that checkpoint tensors obeying rule fill; per_shard ones hold one value per
    shard, others are split along dim 0."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.rule, param.per_shard, param.load_transform = rule, per_shard, transform
    layer.register_parameter(name, param)


def replace_param(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a parameter for its runtime form (after loading)."""
    setattr(layer, name, nn.Parameter(value, requires_grad=False))


def add_per_channel_int8(layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
    """The tensors of a per-channel int8 weight (W8A8_DYNAMIC's and W8A16's): weight [N, K], weight_scale and
    weight_offset [N, 1]."""
    add_param(layer, "weight", (out_features, in_features), torch.int8, INT8_WEIGHT)
    add_param(layer, "weight_scale", (out_features, 1), torch.float32, WEIGHT_SCALE)
    add_param(layer, "weight_offset", (out_features, 1), torch.float32, WEIGHT_OFFSET)
    layer.params_dtype = dtype


class QuantMethod:
    """Base of all linear methods. model_dtype: the dtype the format's math rounds scales to (vLLM-Ascend's model
    dtype: dtype= where given, else the checkpoint's), whatever dtype the activations run in here."""

    def __init__(self, model_dtype: torch.dtype | None = None):
        self.model_dtype = model_dtype

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        """Register the parameters (empty) that the checkpoint fills; the layer adds its float bias itself."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn loaded parameters into their runtime form."""

    def apply(self, layer: nn.Module, x: torch.Tensor | Int8Rows, bias: torch.Tensor | None) -> torch.Tensor:
        """y [T, N] in x's dtype from x [T, K] (or from x quantized by the op before, as input_quant says)."""
        raise NotImplementedError

    def input_quant(self, layer: nn.Module) -> InputQuant | None:
        """How the layer quantizes its input (after loading), for the op before it to do; None: float input."""
        return None


class UnquantizedMethod(QuantMethod):
    """Float weights: y = x W^T + b."""

    def create_weights(self, layer, in_features, out_features, dtype):
        add_param(layer, "weight", (out_features, in_features), dtype, FLOAT_TENSOR)

    def process_weights_after_loading(self, layer):
        replace_param(layer, "weight", layer.ops.pack_float_weight(layer.weight.data))

    def apply(self, layer, x, bias):
        return layer.ops.float_linear(x, layer.weight, bias)


class W8A8StaticMethod(QuantMethod):
    """W8A8: static per-tensor asymmetric activations, per-channel int8 weights, int32 quant_bias."""

    def create_weights(self, layer, in_features, out_features, dtype):
        num_shards = len(layer.shard_prefixes)
        add_param(layer, "weight", (out_features, in_features), torch.int8, INT8_WEIGHT)
        for name, rule in (("weight_scale", WEIGHT_SCALE), ("weight_offset", WEIGHT_OFFSET)):  # unused at run time
            add_param(layer, name, (out_features, 1), torch.float32, rule)  # (deq_scale holds the scale): ModelSlim's
            getattr(layer, name).optional = True  # V1 saver leaves them out, as vLLM-Ascend may
        add_param(layer, "input_scale", (num_shards,), torch.float32, INPUT_SCALE, per_shard=True)
        add_param(layer, "input_offset", (num_shards,), torch.float32, OFFSET, per_shard=True)
        add_param(layer, "quant_bias", (out_features,), torch.int32, QUANT_BIAS)
        add_param(layer, "deq_scale", (out_features,), torch.float32, DEQ_SCALE, transform=decode_deq_scale)
        layer.params_dtype = dtype

    def process_weights_after_loading(self, layer):
        scale, offset = _fused_input_params(layer)
        # as the NPU: input_scale cast to the model dtype first, its reciprocal taken in that dtype
        inv = 1.0 / scale.to(self.model_dtype or layer.params_dtype)
        layer.register_buffer("input_inv_scale", inv.to(layer.params_dtype).reshape(1))
        layer.register_buffer("input_offset_rt", offset.to(layer.params_dtype).reshape(1))
        replace_param(layer, "weight", layer.ops.pack_weight(layer.weight.data))

    def input_quant(self, layer):
        return InputQuant(layer.input_inv_scale, layer.input_offset_rt)

    def apply(self, layer, x, bias):
        # x: [T, K]; the float bias is folded into quant_bias, so `bias` is not added (as on the NPU)
        return layer.ops.static_linear(
            x,
            layer.weight,
            layer.input_inv_scale,
            layer.input_offset_rt,
            layer.quant_bias,
            layer.deq_scale,
            x.dtype,
            layer.reduce,
        )  # [T, N]


def _fused_input_params(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """One input_scale/offset for a fused layer; shards should agree, else the last one wins (as vLLM)."""
    scales, offsets = layer.input_scale.data, layer.input_offset.data  # [S]
    if not (torch.all(scales == scales[-1]) and torch.all(offsets == offsets[-1])):
        logger.warning(
            "%s: shards %s have different input_scale/input_offset; using the last shard's",
            layer.prefix,
            layer.shard_prefixes,
        )
    return scales[-1], offsets[-1]


class W8A8DynamicMethod(QuantMethod):
    """W8A8_DYNAMIC: symmetric per-token activations, per-channel int8 weights, scales in the model dtype."""

    def create_weights(self, layer, in_features, out_features, dtype):
        add_per_channel_int8(layer, in_features, out_features, dtype)

    def process_weights_after_loading(self, layer):
        # scales as the NPU sees them (rounded to the model dtype), held in fp32 for the kernel: [N]
        w_scale = layer.weight_scale.data.to(self.model_dtype or layer.params_dtype).float().reshape(-1)
        replace_param(layer, "weight_scale", w_scale)
        replace_param(layer, "weight", layer.ops.pack_weight(layer.weight.data))

    def input_quant(self, layer):
        return PER_TOKEN

    def apply(self, layer, x, bias):
        # x: [T, K] -> [T, N]
        return layer.ops.dynamic_linear(x, layer.weight, layer.weight_scale, bias, x.dtype, layer.reduce)


class W8A16Method(UnquantizedMethod):
    """W8A16: per-channel int8 weights, float activations: y = x ((W_q + weight_offset) * weight_scale)^T + b, the
    scale and offset in the model dtype (vLLM-Ascend's npu_weight_quant_batchmatmul). The weight is dequantized to
    the activations' dtype once, at load, and runs as a float linear (so tensor parallel treats it as one)."""

    def create_weights(self, layer, in_features, out_features, dtype):
        add_per_channel_int8(layer, in_features, out_features, dtype)

    def process_weights_after_loading(self, layer):
        model_dtype = self.model_dtype or layer.params_dtype
        w = weight_only_weight(layer.weight.data, layer.weight_scale.data, layer.weight_offset.data, model_dtype)
        replace_param(layer, "weight", w.to(layer.params_dtype))  # [N, K]
        del layer.weight_scale, layer.weight_offset  # folded into the weight
        super().process_weights_after_loading(layer)


METHODS_BY_TYPE: dict[str, type[QuantMethod]] = {
    W8A8: W8A8StaticMethod,
    W8A8_DYNAMIC: W8A8DynamicMethod,
    W8A16: W8A16Method,
}
