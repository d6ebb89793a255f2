"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): the Qwen2 decoder (q/k/v biases where qkv_bias) whose MLP is routed
experts behind a softmax top-k router (renormalized where norm_topk_prob) plus one shared expert scaled per token by
sigmoid(shared_expert_gate x), in the layers that format.architectures.is_moe_layer names; dense in the rest."""

from __future__ import annotations

from slimquant.layers.moe import sparse_or_dense_mlp
from slimquant.models.llama import LlamaForCausalLM, Variant
from slimquant.models.qwen3_moe import PACKED_MODULES


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    """Qwen2-MoE models."""

    packed_modules_mapping = PACKED_MODULES  # qkv, gate_up (the shared expert's too), experts

    mlp = staticmethod(sparse_or_dense_mlp)  # routed + shared experts in is_moe_layer's layers, dense in the others

    @staticmethod
    def variant(config) -> Variant:
        if getattr(config, "use_sliding_window", False):
            raise ValueError("Qwen2-MoE sliding-window attention (use_sliding_window=true) is not supported")
        return Variant(qkv_bias=bool(getattr(config, "qkv_bias", True)))
