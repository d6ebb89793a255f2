"""Random-weight Hugging Face checkpoints for tests and benchmarks, no model hub needed (dev tooling: not part of
the library's API).

`make_tiny_model("llama", dir)` writes config.json, model.safetensors and a small byte-level BPE
tokenizer with a chat template; transformers' own modeling code is the float reference for them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from slimquant.format.schemes import FLOAT, Scheme, parse_scheme

ARCHS = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "glm4_moe", "glm4_moe_lite", "deepseek_v2", "deepseek_v3")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello, my name is Ada and the future of AI is bright. "
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    "in want of a wife. The capital of France is Paris. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. "
    "Caf\u00e9, na\u00efve, \u00fcber, \u4f60\u597d, \u3053\u3093\u306b\u3061\u306f, emoji \U0001f600. "
)


def tiny_config(arch: str, **overrides):
    """A 2-layer, hidden-64 transformers config of the given architecture."""
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        Glm4MoeConfig,
        Glm4MoeLiteConfig,
        LlamaConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    kw = common | overrides  # to the constructor: derived fields (e.g. layer_types) follow the overrides
    if arch == "llama":
        cfg = LlamaConfig(**kw)
    elif arch == "qwen2":
        cfg = Qwen2Config(**kw)
    elif arch == "qwen3":
        cfg = Qwen3Config(**({"head_dim": 16} | kw))
    elif arch == "qwen2_moe":  # layer 0 dense, layer 1 routed experts and the gated shared expert
        moe = dict(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2)
        cfg = Qwen2MoeConfig(**(moe | {"mlp_only_layers": [0]} | kw))
    elif arch == "qwen3_moe":  # layer 0 dense, layer 1 routed experts
        moe = dict(head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0])
        cfg = Qwen3MoeConfig(**(moe | {"norm_topk_prob": True} | kw))
    elif arch == "glm4_moe":  # layer 0 dense, layer 1 shared + routed experts; rope on half of each head
        moe = {k: v for k, v in _mla_moe_fields(arch).items() if not k.startswith(("kv_", "q_", "qk_", "v_"))}
        glm = dict(head_dim=16, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=False)
        cfg = Glm4MoeConfig(**(moe | glm | kw))
    elif arch in ("deepseek_v2", "deepseek_v3"):
        cls = DeepseekV3Config if arch == "deepseek_v3" else DeepseekV2Config
        cfg = cls(**(_mla_moe_fields(arch) | common | {"num_key_value_heads": 4} | overrides))
    elif arch == "glm4_moe_lite":  # GLM-4.7-Flash: DeepSeek-V3's MLA and MoE; mlp_layer_types: layer 0 dense
        mla = {k: v for k, v in _mla_moe_fields(arch).items() if k != "first_k_dense_replace"}
        mla["v_head_dim"] = 24  # wider than qk_nope_head_dim (16), as GLM-4.7-Flash's 256 and 192
        cfg = Glm4MoeLiteConfig(**(mla | common | {"num_key_value_heads": 4} | overrides))
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")
    return cfg


def _mla_moe_fields(arch: str) -> dict:
    fields = dict(
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    if arch == "deepseek_v2":
        fields.update(topk_method="group_limited_greedy", scoring_func="softmax")
    return fields


def make_tokenizer():
    """A deterministic byte-level BPE tokenizer (vocab 512) with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_TOKENIZER_TEXT] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    arch: str, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides
) -> Path:
    """Write a random tiny model of `arch` (weights, config, tokenizer, generation config) to out_dir."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    tok = make_tokenizer()
    cfg = tiny_config(arch, **overrides)
    cfg.vocab_size = max(cfg.vocab_size, len(tok))
    cfg.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    cfg.bos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    _spread_weights(model)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _spread_weights(model: torch.nn.Module) -> None:
    """Give norms and biases non-trivial random values so tests exercise them (HF inits them to 1 / 0; the routers'
    e_score_correction_bias is a buffer in transformers 5)."""
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias") or name.endswith("e_score_correction_bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0.0, 0.08)


def make_random_checkpoint(
    arch: str, out_dir: str | os.PathLike, qtype: str = "float", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
    **shape,
) -> Path:  # fmt: skip
    """A random checkpoint of a dense model's shape (llama / qwen2 / qwen3), written tensor by tensor without
    building the model: float (Hugging Face layout), or ascend qtype "w8a8" / "w8a8_dynamic" straight from random
    int8 weights and scales (the quantizer's default plan, no calibration). For speed benches of large shapes."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"random checkpoints are written for dense models only (llama, qwen2, qwen3), not {arch!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    cfg = tiny_config(arch, **shape)
    cfg.vocab_size = max(cfg.vocab_size, len(tok))
    cfg.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    cfg.bos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(seed)
    if qtype == "float":
        _write_float(out, ((name, _random_float(name, s, dtype, gen)) for name, s in shapes.items()))
    else:
        _write_ascend(out, cfg.to_dict(), shapes, parse_scheme(qtype), dtype, gen)
    cfg.save_pretrained(out)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _random_float(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Norm weights near 1, matrices uniform with 1 / sqrt(fan-in) spread (activations keep their size; drawn as
    int8, which is quicker for 7B shapes), the rest small."""
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    if len(shape) == 2 and not name.endswith("embed_tokens.weight"):
        return _random_int8(shape, gen).to(dtype) * (1.0 / (_INT8_STD * shape[-1] ** 0.5))
    return (torch.randn(shape, generator=gen) * 0.1).to(dtype)


_INT8_STD = 74.0  # the standard deviation of uniform int8


_POOL = 1 << 22  # int8 values drawn per tensor at most: torch draws about 0.3 G/s on one core


def _random_int8(shape: tuple[int, ...], gen: torch.Generator, pool: int = _POOL) -> torch.Tensor:
    """Uniform in [-127, 127], as symmetric weight quantization writes (no -128: the native kernels' fast path). A
    tensor of more than `pool` values is one drawn pool, copied at a random rotation per `pool` values: a 7B
    shape's weights in seconds instead of minutes of a GPU machine's time."""
    n = math.prod(shape)
    if n <= pool:
        return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
    drawn = torch.randint(-127, 128, (pool,), generator=gen, dtype=torch.int8)
    twice = torch.cat([drawn, drawn])  # [2 * pool]: any rotation of drawn is one slice
    out = torch.empty(n, dtype=torch.int8)
    for i, start in enumerate(torch.randint(0, pool, (math.ceil(n / pool),), generator=gen).tolist()):
        part = out[i * pool : (i + 1) * pool]
        part.copy_(twice[start : start + part.numel()])
    return out.view(shape)


def _write_float(out: Path, tensors: Iterator[tuple[str, torch.Tensor]], shard_bytes: int = 2 * 2**30) -> None:
    """(name, tensor) pairs as model-0000i-of-0000N.safetensors shards of about shard_bytes, and their index."""
    from slimquant.format.safetensors_io import StreamingShard

    done: list[StreamingShard] = []
    shard, size = None, 0
    for name, t in tensors:
        if shard is None or size >= shard_bytes:
            if shard is not None:
                shard.finish()
            shard, size = StreamingShard(out / f".part-{len(done)}.safetensors"), 0
            done.append(shard)
        shard.add(name, t)
        size += t.numel() * t.element_size()
    shard.finish()
    weight_map = {}
    for i, s in enumerate(done, start=1):
        final = f"model-{i:05d}-of-{len(done):05d}.safetensors"
        os.replace(s.path, out / final)
        weight_map |= dict.fromkeys(s.names, final)
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_ascend(out: Path, config: dict, shapes: dict, qtype: Scheme, dtype: torch.dtype, gen) -> None:
    """The ascend checkpoint of the quantizer's default plan for qtype: each quantized linear's int8 weight
    uniform, its scale 1 / (std sqrt(K)) (a fan-in-preserving linear), static input range [-4, 4]."""
    from slimquant.format.architectures import arch_spec
    from slimquant.format.checkpoint import ModelSlimWriter
    from slimquant.quant.plan import plan_types
    from slimquant.quant.qlinear import linear_tensors

    spec = arch_spec(config)
    plan = plan_types(spec, int(config["num_hidden_layers"]), qtype, [], [], config)
    writer = ModelSlimWriter(out, spec.model_quant_type or qtype)
    for name, shape in shapes.items():
        prefix, _, leaf = name.rpartition(".")
        if plan.get(prefix, FLOAT) == FLOAT:
            writer.add(name, _random_float(name, shape, dtype, gen), FLOAT)
        elif leaf == "weight":
            n, k = shape
            w_q = _random_int8(shape, gen)  # [N, K]
            w_s = torch.full((n, 1), 1.0 / (_INT8_STD * k**0.5))  # [N, 1]
            bias = _random_float(f"{prefix}.bias", (n,), dtype, gen) if f"{prefix}.bias" in shapes else None
            tensors = linear_tensors(None, bias, plan[prefix], (-4.0, 4.0), dtype, quantized=(w_q, w_s))
            for suffix, (t, t_type) in tensors.items():
                writer.add(f"{prefix}.{suffix}", t, t_type)
        else:
            assert leaf == "bias", name  # written with its weight
    writer.close()
