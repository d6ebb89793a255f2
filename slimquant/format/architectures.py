"""The one architecture registry both halves read: per model_type, the runtime's model class and the quantizer's
tables, as data (decoder-layer classes, linears, fused groups, smoothing pairs, keep-float)."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from slimquant.format.schemes import W8A8, W8A8_DYNAMIC, Scheme

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

# Routed experts "{e}" form one FusedMoE layer (one type, one w13 input quantization): DeepSeek's, and
# Qwen3-MoE's (the Qwen3 decoder with them, no shared experts, in the layers that is_moe_layer names).
MOE_FUSED = (
    ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),  # one FusedMoE w13: one input quantization
    ("mlp.experts.*.down_proj",),  # w2
)
# --type w8a8 on MoE models: attention static, every MLP linear dynamic (ModelSlim's DeepSeek and Qwen3-MoE
# recipes, mix_cfg {"*.mlp.*": "w8a8_dynamic", "*": "w8a8"}; no loader runs static routed experts).
MLP_DYNAMIC_MIX = (("*.mlp.*", W8A8_DYNAMIC),)
# config.json keys that ModelSlim's MoE scripts add, by --type
MOE_CONFIG_FIELDS = {W8A8: {"quantize": "w8a8_dynamic"}, W8A8_DYNAMIC: {"quantize": "w8a8_dynamic"}}

# DeepSeek V2/V3, Kimi K2: multi-head latent attention (q_proj instead of q_a/q_b when q_lora_rank is null), then
# a dense MLP (layers < first_k_dense_replace) or MoE: shared experts and routed experts "{e}" (per expert on disk).
MLA = (
    "self_attn.q_a_proj",
    "self_attn.q_b_proj",
    "self_attn.q_proj",
    "self_attn.kv_a_proj_with_mqa",
    "self_attn.kv_b_proj",
    "self_attn.o_proj",
)
SHARED_EXPERTS = ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj")
# Qwen2-MoE's one shared expert (its output times sigmoid(mlp.shared_expert_gate x), a float [1, H] linear)
SHARED_EXPERT = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")
ROUTED_EXPERT = ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")
MLA_FUSED = (
    ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),  # fused_qkv_a_proj: one input_scale/offset
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
    *MOE_FUSED,
)
MOE_SAME_TYPE = (("mlp.experts.*",),)  # one FusedMoE layer: every routed expert linear shares one type
MLA_SMOOTH_PAIRS = (
    ("input_layernorm", ("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")),
    ("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
)
# --type w8a8 on Llama / Qwen by default: mlp.down_proj dynamic, the rest static. Its input silu(gate) * up holds
# massive activations on a few tokens (the first token's above all) that one per-tensor static scale cannot follow
# (docs/benchmarks.md, "Accuracy"). quantize(static_all=True) (--static-all) drops it.
DOWN_DYNAMIC_MIX = (("*.mlp.down_proj", W8A8_DYNAMIC),)


@dataclass(frozen=True)
class ArchSpec:
    """One model_type: the runtime's model class, and how the quantizer handles it (transformers classes and
    per-layer tables)."""

    model_class: str  # class name in slimquant.models (the runtime), also the HF `architectures` name
    module: str  # transformers modeling module
    decoder_layer: str  # class name of one decoder layer
    rotary: str  # class name of the rotary embedding
    linears: tuple[str, ...] = ATTN + MLP  # relative to model.layers.{i}.
    fused: tuple[tuple[str, ...], ...] = FUSED
    smooth_pairs: tuple[tuple[str, tuple[str, ...]], ...] = SMOOTH_PAIRS
    keep_float: tuple[str, ...] = ("lm_head",)  # globs over full linear names
    same_type: tuple[tuple[str, ...], ...] = ()  # further groups (globs) that must share one type, like fused
    w8a8_mix: tuple[tuple[str, Scheme], ...] = ()  # (glob, TYPE) applied after --mix when --type is w8a8
    w8a8_default_mix: tuple[tuple[str, Scheme], ...] = ()  # then these, unless static_all (accuracy, not format)
    model_quant_type: Scheme | None = None  # forced description model_quant_type (else --type)
    static_method: str = "smoothquant"  # default anti-outlier when some linear is static W8A8
    dynamic_method: str = "smoothquant"  # default anti-outlier when every linear is dynamic (or float)
    config_fields: dict[Scheme, dict[str, str]] | None = None  # --type -> fields added to config.json
    config_indent: int = 2
    config_class: str | None = None  # build the config from config.json with this class (no AutoConfig)
    # (glob over layer linears, config flag that turns their bias on, or None: always) as transformers (and vLLM)
    # build them; every other linear is bias-free
    biases: tuple[tuple[str, str | None], ...] = (("self_attn.[qkvo]_proj", "attention_bias"), ("mlp.*", "mlp_bias"))
    int8_kv_cache: bool = True  # C8 scales are per k / v channel: standard attention (MLA caches a latent)
    expert_mlp: str | None = None  # MoE models: transformers' class of one expert's MLP (the quantizer unfuses them)
    shared_experts: tuple[str, ...] = SHARED_EXPERTS  # a MoE layer's shared experts' linears, where it has them

    def layer_linears(self, config: dict, i: int) -> tuple[str, ...]:
        """Linears of decoder layer i (relative names): dense or MoE MLP, MLA with or without q_lora_rank."""
        present = [r for r in self.linears if r not in _absent(config, i)]
        if is_moe_layer(config, i):
            experts = [r.format(e=e) for e in range(num_routed_experts(config)) for r in ROUTED_EXPERT]
            shared = list(self.shared_experts) if has_shared_experts(config) else []
            present = [r for r in present if r not in MLP] + shared + experts
        return tuple(present)

    def has_bias(self, config, rel: str) -> bool:
        """Whether the model builds layer linear rel (relative name) with a bias."""
        return any(
            fnmatchcase(rel, glob) and (flag is None or bool(config_value(config, flag))) for glob, flag in self.biases
        )

    def layer_fused(self, linears: tuple[str, ...], with_same_type: bool = False) -> list[tuple[str, ...]]:
        """The fused groups (globs allowed; + same_type) resolved to one layer's linears; empty groups dropped."""
        table = self.fused + (self.same_type if with_same_type else ())
        groups = [tuple(r for r in linears if any(fnmatchcase(r, g) for g in group)) for group in table]
        return [g for g in groups if g]

    def layer_smooth_pairs(self, linears: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
        """The smoothing pairs restricted to the given linears of one layer."""
        pairs = [(src, tuple(r for r in group if r in linears)) for src, group in self.smooth_pairs]
        return [(src, group) for src, group in pairs if group]


def _absent(config: dict, i: int) -> tuple[str, ...]:
    """MLA linears that this config does not have."""
    if "kv_lora_rank" not in config:
        return ()
    if config.get("q_lora_rank") is None:
        return ("self_attn.q_a_proj", "self_attn.q_b_proj")
    return ("self_attn.q_proj",)


def config_value(config, key: str, default=None):
    """config[key] of a config.json dict, or the attribute of a transformers config; default where absent/None."""
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return default if value is None else value


def has_shared_experts(config) -> bool:
    """Whether a MoE layer has shared experts: DeepSeek's n_shared_experts, Qwen2-MoE's
    shared_expert_intermediate_size."""
    return bool(config_value(config, "n_shared_experts") or config_value(config, "shared_expert_intermediate_size"))


def num_routed_experts(config) -> int:
    """Routed experts per MoE layer: DeepSeek's n_routed_experts, Qwen3-MoE's num_experts (num_local_experts as
    transformers 5 writes it); 0 for a dense model."""
    keys = ("n_routed_experts", "num_experts", "num_local_experts")
    return int(next((v for k in keys if (v := config_value(config, k))), 0))


def is_moe_layer(config, i: int) -> bool:
    """Whether layer i has the MoE MLP. Where mlp_layer_types lists them (GLM-4.7-Flash), the "sparse" ones and the
    MTP layers past the list (MoE, as DeepSeek-V3's); DeepSeek: from first_k_dense_replace on, every
    moe_layer_freq-th; Qwen3-MoE: every decoder_sparse_step-th (counting from 1) that mlp_only_layers does not name."""
    if not num_routed_experts(config):
        return False
    if types := config_value(config, "mlp_layer_types"):
        return i >= len(types) or types[i] == "sparse"
    if config_value(config, "n_routed_experts"):
        freq = int(config_value(config, "moe_layer_freq", 1)) or 1
        return i >= int(config_value(config, "first_k_dense_replace", 0)) and i % freq == 0
    step = int(config_value(config, "decoder_sparse_step", 1)) or 1
    return i not in config_value(config, "mlp_only_layers", []) and (i + 1) % step == 0


def _mla(module: str, prefix: str, **kw) -> ArchSpec:
    return ArchSpec(
        f"{prefix}ForCausalLM",
        module,
        f"{prefix}DecoderLayer",
        f"{prefix}RotaryEmbedding",
        linears=MLA + MLP,
        fused=MLA_FUSED,
        same_type=MOE_SAME_TYPE,
        smooth_pairs=MLA_SMOOTH_PAIRS,
        keep_float=("lm_head", "*.self_attn.kv_b_proj"),
        w8a8_mix=MLP_DYNAMIC_MIX,
        model_quant_type=W8A8_DYNAMIC,
        static_method="iterative",
        dynamic_method="none",  # ModelSlim's DeepSeek recipe with --dynamic: no smoothing
        config_fields={
            W8A8: {"mla_quantize": "w8a8", "quantize": "w8a8_dynamic"},
            W8A8_DYNAMIC: {"mla_quantize": "w8a8_dynamic", "quantize": "w8a8_dynamic"},
        },
        config_indent=4,
        biases=tuple((f"self_attn.{r}", "attention_bias") for r in ("q_a_proj", "kv_a_proj_with_mqa", "o_proj")),
        int8_kv_cache=False,
        expert_mlp=f"{prefix}MLP",
        **kw,
    )


_DSV2 = "transformers.models.deepseek_v2.modeling_deepseek_v2"
_DSV3 = "transformers.models.deepseek_v3.modeling_deepseek_v3"
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        "LlamaForCausalLM",
        "transformers.models.llama.modeling_llama",
        "LlamaDecoderLayer",
        "LlamaRotaryEmbedding",
        w8a8_default_mix=DOWN_DYNAMIC_MIX,
    ),
    "qwen2": ArchSpec(
        "Qwen2ForCausalLM",
        "transformers.models.qwen2.modeling_qwen2",
        "Qwen2DecoderLayer",
        "Qwen2RotaryEmbedding",
        w8a8_default_mix=DOWN_DYNAMIC_MIX,
        biases=(("self_attn.[qkv]_proj", None),),
    ),
    "qwen3": ArchSpec(
        "Qwen3ForCausalLM",
        "transformers.models.qwen3.modeling_qwen3",
        "Qwen3DecoderLayer",
        "Qwen3RotaryEmbedding",
        w8a8_default_mix=DOWN_DYNAMIC_MIX,
        biases=(("self_attn.[qkvo]_proj", "attention_bias"),),
    ),
    "qwen2_moe": ArchSpec(
        "Qwen2MoeForCausalLM",
        "transformers.models.qwen2_moe.modeling_qwen2_moe",
        "Qwen2MoeDecoderLayer",
        "Qwen2MoeRotaryEmbedding",
        fused=FUSED + (SHARED_EXPERT[:2],) + MOE_FUSED,
        same_type=MOE_SAME_TYPE,
        w8a8_mix=MLP_DYNAMIC_MIX,  # as ModelSlim's MoE recipes: attention static, every MLP linear dynamic
        config_fields=MOE_CONFIG_FIELDS,
        biases=(("self_attn.[qkv]_proj", "qkv_bias"),),
        expert_mlp="Qwen2MoeMLP",
        shared_experts=SHARED_EXPERT,
    ),
    "qwen3_moe": ArchSpec(
        "Qwen3MoeForCausalLM",
        "transformers.models.qwen3_moe.modeling_qwen3_moe",
        "Qwen3MoeDecoderLayer",
        "Qwen3MoeRotaryEmbedding",
        fused=FUSED + MOE_FUSED,
        same_type=MOE_SAME_TYPE,
        w8a8_mix=MLP_DYNAMIC_MIX,
        config_fields=MOE_CONFIG_FIELDS,  # ModelSlim's quant_qwen_moe_w8a8.py: "quantize": "w8a8_dynamic"
        biases=(("self_attn.[qkvo]_proj", "attention_bias"),),
        expert_mlp="Qwen3MoeMLP",
    ),
    "glm4_moe": ArchSpec(
        "Glm4MoeForCausalLM",
        "transformers.models.glm4_moe.modeling_glm4_moe",
        "Glm4MoeDecoderLayer",
        "Glm4MoeRotaryEmbedding",
        fused=FUSED + (SHARED_EXPERTS[:2],) + MOE_FUSED,
        same_type=MOE_SAME_TYPE,
        w8a8_mix=MLP_DYNAMIC_MIX,  # as ModelSlim's MoE recipes: attention static, every MLP linear dynamic
        biases=(("self_attn.[qkv]_proj", "attention_bias"),),
        expert_mlp="Glm4MoeMLP",
    ),
    "deepseek_v2": _mla(_DSV2, "DeepseekV2"),
    "deepseek_v3": _mla(_DSV3, "DeepseekV3"),
    "kimi_k2": _mla(_DSV3, "DeepseekV3", config_class="DeepseekV3Config"),  # DeepSeek-V3 layout, own model_type
    # GLM-4.7-Flash: DeepSeek-V3's MLA and MoE under GLM's names; vLLM-Ascend's glm4_moe_lite entry fuses as V3's
    "glm4_moe_lite": _mla("transformers.models.glm4_moe_lite.modeling_glm4_moe_lite", "Glm4MoeLite"),
}

LAYER_PREFIX = "model.layers."
EMBED_PREFIX = "model.embed_tokens."


def arch_spec(config) -> ArchSpec:
    """The entry for a config (a config.json dict or a transformers config): by model_type, or by the
    `architectures` names where it has none; ValueError listing what is supported."""
    model_type = config_value(config, "model_type")
    archs = config_value(config, "architectures", [])
    by_class = {spec.model_class: spec for spec in reversed(ARCHS.values())}  # the first model_type of a class
    found = ARCHS.get(model_type) if model_type else next((by_class[a] for a in archs if a in by_class), None)
    if found is None:
        text = config_value(config, "text_config")
        inner = config_value(text, "model_type") if text is not None else None
        wrapper = (
            f"; it wraps a {inner!r} text model with other modalities, which slimquant does not read" if inner else ""
        )
        raise ValueError(
            f"unsupported architecture {model_type!r} (config.json: model_type {model_type!r}, architectures "
            f"{archs}{wrapper}); supported model types: {', '.join(sorted(ARCHS))}; architectures: "
            f"{', '.join(sorted(by_class))}"
        )
    return found


def layer_prefix(i: int) -> str:
    """'model.layers.{i}.'"""
    return f"{LAYER_PREFIX}{i}."


def layer_index(name: str) -> int | None:
    """i of 'model.layers.{i}.*', else None."""
    if not name.startswith(LAYER_PREFIX):
        return None
    index = name[len(LAYER_PREFIX) :].split(".", 1)[0]
    return int(index) if index.isdigit() else None
