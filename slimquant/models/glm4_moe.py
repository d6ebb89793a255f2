"""GLM-4.5 / 4.6 / 4.7 (glm4_moe): the Llama decoder with q/k/v biases (attention_bias), per-head q/k norms where
use_qk_norm, and rope on the first partial_rotary_factor of each head (half); its MLP is dense in the first
first_k_dense_replace layers and DeepSeek-V3's MoE after them (sigmoid router with e_score_correction_bias, grouped
top-k, routed_scaling_factor, shared experts), with layers.moe's grouped int8 kernels, tensor and expert parallel."""

from __future__ import annotations

from slimquant.layers.moe import sparse_or_dense_mlp
from slimquant.models.llama import LlamaForCausalLM, Variant
from slimquant.models.qwen3_moe import PACKED_MODULES


class Glm4MoeForCausalLM(LlamaForCausalLM):
    """GLM-4.5 / 4.6 / 4.7 and GLM-4.5-Air."""

    packed_modules_mapping = PACKED_MODULES  # vLLM-Ascend's glm4_moe entry: qkv, gate_up, experts

    mlp = staticmethod(sparse_or_dense_mlp)  # routed experts from first_k_dense_replace on, dense before

    @staticmethod
    def variant(config) -> Variant:
        return Variant(qkv_bias=bool(getattr(config, "attention_bias", False)), qk_norm=bool(config.use_qk_norm))
