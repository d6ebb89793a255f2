"""Qwen3-MoE: the Qwen3 decoder whose MLP is routed experts (softmax top-k router, no shared experts) in the layers
that format.architectures.is_moe_layer names (every decoder_sparse_step-th, not in mlp_only_layers), dense in the
rest. The experts are layers.moe's: grouped int8 kernels, tensor and expert parallel as for DeepSeek."""

from __future__ import annotations

from slimquant.layers.moe import PACKED_EXPERTS, sparse_or_dense_mlp
from slimquant.models.llama import PACKED_MODULES as LLAMA_PACKED_MODULES
from slimquant.models.qwen3 import Qwen3ForCausalLM

# the Llama family's fused layers, and one MoE layer's experts (vLLM-Ascend's packed_modules_model_mapping)
PACKED_MODULES = LLAMA_PACKED_MODULES | PACKED_EXPERTS


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Qwen3-MoE models (Qwen3-30B-A3B, Qwen3-235B-A22B)."""

    packed_modules_mapping = PACKED_MODULES

    mlp = staticmethod(sparse_or_dense_mlp)  # routed experts in is_moe_layer's layers, dense in the others
