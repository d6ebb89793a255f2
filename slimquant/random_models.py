"""Random-weight Hugging Face checkpoints for tests and benchmarks, no model hub needed (dev tooling: not part of
the library's API).

`make_tiny_model("llama", dir)` writes config.json, model.safetensors and a small byte-level BPE
tokenizer with a chat template; transformers' own modeling code is the float reference for them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "qwen3", "deepseek_v2", "deepseek_v3")
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
    from transformers import DeepseekV2Config, DeepseekV3Config, LlamaConfig, Qwen2Config, Qwen3Config

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
    elif arch in ("deepseek_v2", "deepseek_v3"):
        cls = DeepseekV3Config if arch == "deepseek_v3" else DeepseekV2Config
        cfg = cls(**(_mla_moe_fields(arch) | common | {"num_key_value_heads": 4} | overrides))
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
    """Give norms and biases non-trivial random values so tests exercise them (HF inits them to 1 / 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias") or name.endswith("e_score_correction_bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0.0, 0.08)
