"""DeepSeek V2 / V3 (and Kimi-K2 and GLM-4.7-Flash, the V3 layout): MLA attention over a latent cache, dense then
MoE MLPs.

Multi-token-prediction layers (index >= num_hidden_layers) are not built; their tensors are ignored.

Tensor parallel: the latent projections (q_a, kv_a) and their norms are whole on every rank, which caches the whole
latent; q / q_b and kv_b are column-parallel (each rank its heads), o_proj row-parallel; MLPs as in layers.mlp and
layers.moe (expert parallel where tp.expert_parallel).
"""

from __future__ import annotations

import torch
from torch import nn

from slimquant.distributed.tensor_parallel import SINGLE, TensorParallel
from slimquant.kernels.int8_input import InputQuant, Int8Rows
from slimquant.layers.linear import Linear
from slimquant.layers.mla import MLAttention
from slimquant.layers.moe import PACKED_EXPERTS, sparse_or_dense_mlp
from slimquant.layers.norm import RMSNorm
from slimquant.layers.quant_config import QuantConfig
from slimquant.layers.rotary import (
    apply_rotary,
    apply_rotary_interleaved,
    mla_softmax_scale,
    rope_parameters,
)
from slimquant.models.base import CausalLM, DecoderModel, LayerParts, MlaParts, PreNormDecoderLayer

PACKED_MODULES = {
    "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"],
    "gate_up_proj": ["gate_proj", "up_proj"],
} | PACKED_EXPERTS


class DeepseekMLA(nn.Module):
    """q (lora or direct) and latent kv projections -> rope on the pe parts -> latent-cache attention -> o_proj."""

    def __init__(self, config, quant_config: QuantConfig, prefix: str, dtype: torch.dtype, tp: TensorParallel):
        super().__init__()
        if quant_config.kv_cache_int8:
            raise ValueError(
                "the checkpoint asks for an int8 (C8) KV cache, which is for standard attention: MLA caches one "
                "latent vector per token, and vLLM-Ascend quantizes it another way (FAKQuant), which slimquant does "
                "not run; quantize the float model again without --kv-cache int8"
            )
        h, nh, eps = config.hidden_size, config.num_attention_heads, config.rms_norm_eps
        self.num_heads = tp.share(nh, "num_attention_heads")[1]  # this rank's heads
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        qk_dim, bias, norm_bias = self.nope + self.rope, bool(config.attention_bias), quant_config.norm_has_bias

        def linear(name: str, k: int, n: int | list[int], has_bias=False, shards=None, parallel=None) -> Linear:
            sizes = n if isinstance(n, list) else [n]
            common = dict(quant_config=quant_config, dtype=dtype, tp=tp, shards=shards, parallel=parallel)
            return Linear(k, sizes, bias=has_bias, prefix=f"{prefix}.{name}", **common)

        kv_a_size = self.kv_lora_rank + self.rope
        if self.q_lora_rank is None:
            self.q_proj = linear("q_proj", h, nh * qk_dim, parallel="column")
            self.kv_a_proj_with_mqa = linear("kv_a_proj_with_mqa", h, kv_a_size, bias)
        else:  # q_a_proj and kv_a_proj_with_mqa read the same input: one GEMM (vLLM's fused_qkv_a_proj)
            shards = PACKED_MODULES["fused_qkv_a_proj"]
            self.fused_qkv_a_proj = linear("fused_qkv_a_proj", h, [self.q_lora_rank, kv_a_size], bias, shards)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps, dtype, bias=norm_bias)
            self.q_b_proj = linear("q_b_proj", self.q_lora_rank, nh * qk_dim, parallel="column")
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps, dtype, bias=norm_bias)
        self.kv_b_proj = linear("kv_b_proj", self.kv_lora_rank, nh * (self.nope + self.v_dim), parallel="column")
        self.o_proj = linear("o_proj", nh * self.v_dim, h, bias, parallel="row")
        # transformers' V2 always rotates interleaved pairs; V3 unless rope_interleave is false
        interleave = config.model_type == "deepseek_v2" or getattr(config, "rope_interleave", True)
        self.rotate = apply_rotary_interleaved if interleave else apply_rotary
        self.interleave = interleave
        scale = mla_softmax_scale(rope_parameters(config), qk_dim)
        self.attn = MLAttention(self.num_heads, self.nope, self.rope, self.v_dim, self.kv_lora_rank, scale)

    @property
    def input_quant(self) -> InputQuant | None:
        """fused_qkv_a_proj's input quantization where it alone reads the input (PreNormDecoderLayer)."""
        return None if self.q_lora_rank is None else self.fused_qkv_a_proj.input_quant

    def forward(self, x: torch.Tensor | Int8Rows, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, H] (or quantized for fused_qkv_a_proj); cos/sin: [T, rope]
        if self.q_lora_rank is None:
            q, kv_a = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        else:
            q_a, kv_a = self.fused_qkv_a_proj(x).split(
                self.fused_qkv_a_proj.out_sizes, dim=-1
            )  # [T, Q_R], [T, R + rope]
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        t = q.shape[0]
        q_nope, q_pe = q.view(t, self.num_heads, -1).split([self.nope, self.rope], dim=-1)  # [T, NH, *]
        latent, k_pe = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)  # [T, R], [T, rope]
        q = torch.cat([q_nope, self.rotate(q_pe, cos, sin)], dim=-1)  # [T, NH, nope + rope]
        k_pe = self.rotate(k_pe[:, None], cos, sin)[:, 0]  # [T, rope]
        o = self.attn(q, self.kv_a_layernorm(latent), k_pe, self.kv_b_proj)  # [T, NH * V]
        return self.o_proj(o)


class DeepseekDecoderLayer(PreNormDecoderLayer):
    """Pre-norm block: MLA and a dense or MoE MLP, each residual add fused into the next norm."""

    def __init__(self, config, quant_config: QuantConfig, index: int, dtype: torch.dtype, tp: TensorParallel):
        super().__init__()
        prefix, eps, bias = f"model.layers.{index}", config.rms_norm_eps, quant_config.norm_has_bias
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, bias=bias)
        self.self_attn = DeepseekMLA(config, quant_config, f"{prefix}.self_attn", dtype, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, bias=bias)
        self.mlp = sparse_or_dense_mlp(config, quant_config, index, f"{prefix}.mlp", dtype, tp)

    def stack_parts(self) -> LayerParts | None:
        """What a whole-step backend needs of this layer (norms, linears, MLA's widths and kv_b_proj, routed
        experts), or None where its norms do not share one eps."""
        attn = self.self_attn
        norms = {"input": self.input_layernorm, "post": self.post_attention_layernorm, "kv_a": attn.kv_a_layernorm}
        if attn.q_lora_rank is not None:
            norms["q_a"] = attn.q_a_layernorm
            linears = {"qkv": attn.fused_qkv_a_proj, "q_b": attn.q_b_proj}
        else:
            linears = {"qkv": attn.q_proj, "kv_a": attn.kv_a_proj_with_mqa}
        if len({n.eps for n in norms.values()}) != 1:
            return None
        mlp_linears, moe = self.mlp_parts()
        linears |= {"o": attn.o_proj} | mlp_linears
        widths = (attn.kv_lora_rank, attn.nope, attn.rope, attn.v_dim, attn.q_lora_rank or 0)
        mla = MlaParts(*widths, attn.interleave, attn.kv_b_proj)
        heads = (attn.num_heads, 1, attn.kv_lora_rank + attn.rope)  # one latent "kv head" for every query head
        weights = {name: (n.weight, n.bias) for name, n in norms.items()}
        return LayerParts(weights, self.input_layernorm.eps, linears, heads, attn.attn.scale, None, moe, mla)


class DeepseekV2ForCausalLM(CausalLM):
    """DeepSeek V2/V3 decoder (MLA + MoE) + LM head."""

    packed_modules_mapping = PACKED_MODULES

    def __init__(self, config, quant_config: QuantConfig, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        """tp: this process's tensor-parallel group (heads, MLP columns, experts and the vocabulary split; the
        latent projections whole)."""
        n = config.num_hidden_layers
        layers = [DeepseekDecoderLayer(config, quant_config, i, dtype, tp) for i in range(n)]
        model = DecoderModel(config, quant_config, dtype, config.qk_rope_head_dim, layers, tp)
        super().__init__(config, quant_config, dtype, model, tp)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek V3 / R1 and Kimi-K2 (same layout; sigmoid noaux_tc routing)."""


class Glm4MoeLiteForCausalLM(DeepseekV3ForCausalLM):
    """GLM-4.7-Flash (glm4_moe_lite): DeepSeek-V3's layout under GLM's model_type, its MoE layers named by
    mlp_layer_types."""
