"""Model classes by config `architectures` name (or model_type as a fallback)."""

from __future__ import annotations

from torch import nn

from slimquant.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from slimquant.models.llama import LlamaForCausalLM
from slimquant.models.qwen2 import Qwen2ForCausalLM
from slimquant.models.qwen3 import Qwen3ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "kimi_k2": "DeepseekV3ForCausalLM",
}


def model_class(config) -> type[nn.Module]:
    """The CausalLM class for a HF config; ValueError listing the supported ones otherwise."""
    for arch in getattr(config, "architectures", None) or []:
        if arch in MODELS:
            return MODELS[arch]
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_TYPES:
        return MODELS[MODEL_TYPES[model_type]]
    raise ValueError(
        f"unsupported model: architectures={getattr(config, 'architectures', None)}, model_type={model_type!r}; "
        f"supported architectures: {sorted(MODELS)}"
    )
