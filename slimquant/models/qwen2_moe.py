"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): the Qwen2 decoder whose MLP is routed experts behind a softmax
top-k router (renormalized where norm_topk_prob) plus one shared expert scaled per token by
sigmoid(shared_expert_gate x), in the layers that format.architectures.is_moe_layer names; dense in the rest."""

from __future__ import annotations

from slimquant.layers.moe import sparse_or_dense_mlp
from slimquant.models.qwen2 import Qwen2ForCausalLM
from slimquant.models.qwen3_moe import PACKED_MODULES


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    """Qwen2-MoE models."""

    packed_modules_mapping = PACKED_MODULES  # qkv, gate_up (the shared expert's too), experts

    mlp = staticmethod(sparse_or_dense_mlp)  # routed + shared experts in is_moe_layer's layers, dense in the others
