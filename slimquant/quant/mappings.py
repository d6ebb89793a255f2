"""Per-architecture tables, as data: decoder-layer classes, linears, fused groups, smoothing pairs, keep-float."""

from __future__ import annotations

from dataclasses import dataclass

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Linears that the runtime fuses into one layer: they must share one quant type and one input_scale/offset.
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
# producer -> linears that read its output. A norm producer absorbs the smoothing scale (and shift) in its
# weight (and bias); a linear producer (up_proj, whose output multiplies silu(gate) channel by channel before
# down_proj) absorbs the scale in its output rows, exactly, but no shift.
SMOOTH_PAIRS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class ArchSpec:
    """How the quantizer handles one model_type: transformers classes and per-layer tables."""

    module: str  # transformers modeling module
    decoder_layer: str  # class name of one decoder layer
    rotary: str  # class name of the rotary embedding
    linears: tuple[str, ...] = ATTN + MLP  # relative to model.layers.{i}.
    fused: tuple[tuple[str, ...], ...] = FUSED
    smooth_pairs: tuple[tuple[str, tuple[str, ...]], ...] = SMOOTH_PAIRS
    keep_float: tuple[str, ...] = ("lm_head",)  # globs over full linear names


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("transformers.models.llama.modeling_llama", "LlamaDecoderLayer", "LlamaRotaryEmbedding"),
    "qwen2": ArchSpec("transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer", "Qwen2RotaryEmbedding"),
    "qwen3": ArchSpec("transformers.models.qwen3.modeling_qwen3", "Qwen3DecoderLayer", "Qwen3RotaryEmbedding"),
}

LAYER_PREFIX = "model.layers."
EMBED_PREFIX = "model.embed_tokens."


def arch_spec(config: dict) -> ArchSpec:
    """The table for config['model_type'], or a ValueError listing the supported architectures."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise ValueError(
            f"unsupported architecture {model_type!r} (config.json model_type); "
            f"the quantizer supports: {', '.join(sorted(ARCHS))}"
        )
    return ARCHS[model_type]


def layer_prefix(i: int) -> str:
    """'model.layers.{i}.'"""
    return f"{LAYER_PREFIX}{i}."
