"""A stand-in for Kimi-K2's configuration_deepseek.py (remote code, loaded through config.json's auto_map): the
DeepSeek-V3 configuration under Kimi's model_type. Written for slimquant's tests; not Moonshot's file."""

from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config as _DeepseekV3Config


class DeepseekV3Config(_DeepseekV3Config):
    model_type = "kimi_k2"
