"""Qwen2: the Llama decoder with q/k/v biases (o_proj has none; Qwen2-MoE's configs can turn them off: qkv_bias)."""

from __future__ import annotations

from slimquant.models.llama import LlamaForCausalLM, Variant


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5 dense models."""

    @staticmethod
    def variant(config) -> Variant:
        if getattr(config, "use_sliding_window", False):
            raise ValueError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
        return Variant(qkv_bias=bool(getattr(config, "qkv_bias", True)))
