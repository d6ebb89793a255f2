"""The runtime's model classes, by the class name that format.architectures gives each model_type."""

from __future__ import annotations

from torch import nn

from slimquant.format.architectures import arch_spec
from slimquant.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, Glm4MoeLiteForCausalLM
from slimquant.models.glm4_moe import Glm4MoeForCausalLM
from slimquant.models.llama import LlamaForCausalLM
from slimquant.models.qwen2 import Qwen2ForCausalLM
from slimquant.models.qwen2_moe import Qwen2MoeForCausalLM
from slimquant.models.qwen3 import Qwen3ForCausalLM
from slimquant.models.qwen3_moe import Qwen3MoeForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        LlamaForCausalLM,
        Qwen2ForCausalLM,
        Qwen2MoeForCausalLM,
        Qwen3ForCausalLM,
        Qwen3MoeForCausalLM,
        DeepseekV2ForCausalLM,
        DeepseekV3ForCausalLM,
        Glm4MoeForCausalLM,
        Glm4MoeLiteForCausalLM,
    )
}


def model_class(config) -> type[nn.Module]:
    """The CausalLM class for a HF config; ValueError listing the supported ones otherwise."""
    return MODELS[arch_spec(config).model_class]
