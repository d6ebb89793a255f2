"""Llama-family decoder (Llama, Qwen2, Qwen3 differ only in biases and per-head q/k norms)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from slimquant.distributed.tensor_parallel import SINGLE, TensorParallel
from slimquant.kernels.int8_input import InputQuant, Int8Rows
from slimquant.layers.attention import Attention
from slimquant.layers.linear import Linear
from slimquant.layers.mlp import dense_mlp
from slimquant.layers.norm import RMSNorm
from slimquant.layers.quant_config import QuantConfig
from slimquant.models.base import CausalLM, DecoderModel, LayerParts, PreNormDecoderLayer


@dataclass(frozen=True)
class Variant:
    """The options that tell the family's members apart."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before rope


# Fused layer -> checkpoint linears whose output rows it concatenates (the quantizer's names).
PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def head_dim_of(config) -> int:
    """config.head_dim if set, else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    """qkv_proj -> (q/k norm) -> rope -> paged attention -> o_proj."""

    def __init__(
        self, config, quant_config: QuantConfig, prefix: str, dtype: torch.dtype, variant: Variant, tp: TensorParallel
    ):
        super().__init__()
        self.num_heads = tp.share(config.num_attention_heads, "num_attention_heads")[1]  # this rank's heads
        kv_groups = min(config.num_key_value_heads, tp.size)  # fewer kv heads than ranks: each on several ranks
        kv_start, self.num_kv_heads = tp.share(config.num_key_value_heads, "num_key_value_heads", kv_groups)
        self.head_dim = head_dim_of(config)
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        common = dict(quant_config=quant_config, dtype=dtype, tp=tp)
        h, shards = config.hidden_size, PACKED_MODULES["qkv_proj"]
        self.qkv_proj = Linear(
            h, [q_size, kv_size, kv_size], bias=variant.qkv_bias, prefix=f"{prefix}.qkv_proj", shards=shards,
            parallel="column", shard_groups=[tp.size, kv_groups, kv_groups], **common,
        )  # fmt: skip
        self.o_proj = Linear(q_size, [h], bias=variant.o_bias, prefix=f"{prefix}.o_proj", parallel="row", **common)
        self.q_norm = self.k_norm = None
        if variant.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, bias=quant_config.norm_has_bias)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, bias=quant_config.norm_has_bias)
        kv_scales_dtype = (quant_config.model_dtype or dtype) if quant_config.kv_cache_int8 else None
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, f"{prefix}.attn", kv_scales_dtype,
            (kv_start, config.num_key_value_heads),
        )  # fmt: skip

    @property
    def input_quant(self) -> InputQuant | None:
        """qkv_proj's input quantization (PreNormDecoderLayer)."""
        return self.qkv_proj.input_quant

    def forward(self, x: torch.Tensor | Int8Rows, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, H] (or quantized for qkv_proj); cos/sin: [T, D]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.out_sizes, dim=-1)
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)  # [T, NH, D]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        o = self.attn(q, k, v, (cos, sin), self.o_proj.input_quant)  # rotated inside: [T, NH * D] (or int8)
        return self.o_proj(o)


class LlamaDecoderLayer(PreNormDecoderLayer):
    """Pre-norm block: attention and MLP (dense, or the experts its model class builds), each with a residual add
    fused into the next norm."""

    def __init__(
        self, config, quant_config: QuantConfig, prefix: str, dtype: torch.dtype, variant: Variant, tp: TensorParallel,
        build_mlp: Callable[[], nn.Module],
    ):  # fmt: skip
        super().__init__()
        eps, bias = config.rms_norm_eps, quant_config.norm_has_bias
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, bias=bias)
        self.self_attn = LlamaAttention(config, quant_config, f"{prefix}.self_attn", dtype, variant, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, bias=bias)
        self.mlp = build_mlp()  # after the attention: a size that cannot split is named in the model's order

    def stack_parts(self) -> LayerParts | None:
        """What a whole-step backend needs of this layer (norms, linears, heads, routed experts), or None where its
        norms do not share one eps."""
        attn = self.self_attn
        norms = {"input": self.input_layernorm, "post": self.post_attention_layernorm}
        if attn.q_norm is not None:  # Qwen3
            norms |= {"q": attn.q_norm, "k": attn.k_norm}
        if len({n.eps for n in norms.values()}) != 1:
            return None
        mlp_linears, moe = self.mlp_parts()
        linears = {"qkv": attn.qkv_proj, "o": attn.o_proj} | mlp_linears
        heads = (attn.num_heads, attn.num_kv_heads, attn.head_dim)
        weights = {name: (n.weight, n.bias) for name, n in norms.items()}
        eps, scale, kv_quant = self.input_layernorm.eps, attn.attn.scale, attn.attn.kv_quant
        return LayerParts(weights, eps, linears, heads, scale, kv_quant, moe)


class LlamaForCausalLM(CausalLM):
    """Llama decoder + LM head (Qwen2 and Qwen3 are variants of it)."""

    packed_modules_mapping = PACKED_MODULES

    def __init__(self, config, quant_config: QuantConfig, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        """tp: this process's tensor-parallel group (heads, MLP columns and the vocabulary split)."""
        variant = self.variant(config)
        layers = []
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}"
            mlp = partial(self.mlp, config, quant_config, i, f"{prefix}.mlp", dtype, tp)
            layers.append(LlamaDecoderLayer(config, quant_config, prefix, dtype, variant, tp, mlp))
        model = DecoderModel(config, quant_config, dtype, head_dim_of(config), layers, tp)
        super().__init__(config, quant_config, dtype, model, tp)

    @staticmethod
    def mlp(config, quant_config: QuantConfig, index: int, prefix: str, dtype: torch.dtype, tp: TensorParallel):
        """Layer index's MLP module."""
        return dense_mlp(config, quant_config, prefix, dtype, tp)

    @staticmethod
    def variant(config) -> Variant:
        """Which of the family's options this architecture uses."""
        bias = bool(getattr(config, "attention_bias", False))
        return Variant(qkv_bias=bias, o_bias=bias)
