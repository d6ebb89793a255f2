"""Qwen3: the Llama decoder with per-head RMSNorm on q and k before rope (head_dim from config)."""

from __future__ import annotations

from slimquant.models.llama import LlamaForCausalLM, Variant


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 dense models."""

    @staticmethod
    def variant(config) -> Variant:
        if getattr(config, "use_sliding_window", False):
            raise ValueError("Qwen3 sliding-window attention (use_sliding_window=true) is not supported")
        bias = bool(getattr(config, "attention_bias", False))
        return Variant(qkv_bias=bias, o_bias=bias, qk_norm=True)
