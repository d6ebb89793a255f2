"""A tiny random Kimi-K2 folder laid out as Moonshot ships one: config.json of model_type kimi_k2 whose auto_map
names its own configuration_deepseek.py, and a tiktoken tokenizer (tiktoken.model, tokenization_kimi.py named by
tokenizer_config.json's auto_map, Kimi's chat format); both loaded only with trust_remote_code. The remote-code
files are stand-ins in tests/models/kimi_k2/ (see their docstrings)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

from slimquant.random_models import make_tiny_model

CODE = Path(__file__).with_name("kimi_k2")
MERGES = [b"th", b"he", b"the", b" t", b" the", b"is", b" is", b"in", b"an", b"er"]  # each of two earlier tokens
SPECIALS = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_{{ m['role'] }}|>{{ m['role'] }}<|im_middle|>{{ m['content'] }}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
)


def make_tiny_kimi(out: Path) -> Path:
    """Write the folder to out: random weights of a 3-layer DeepSeek-V3 shaped as Kimi-K2 is (its routing: one
    expert group, 8 of 24 experts per token, scaled by 2.827; a dense first layer), hidden size 64."""
    kimi = dict(n_routed_experts=24, num_experts_per_tok=8, n_group=1, topk_group=1, routed_scaling_factor=2.827)
    make_tiny_model("deepseek_v3", out, num_hidden_layers=3, **kimi)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (out / name).unlink()
    ranks = [bytes([b]) for b in range(256)] + MERGES
    (out / "tiktoken.model").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    config = json.loads((out / "config.json").read_text())
    reserved = [f"<|reserved_token_{i}|>" for i in range(config["vocab_size"] - len(ranks) - len(SPECIALS))]
    special_ids = {s: len(ranks) + i for i, s in enumerate(SPECIALS + reserved)}  # as Kimi: every id of the head
    tokenizer_config = {
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "tokenizer_class": "TikTokenTokenizer",
        "added_tokens_decoder": {str(i): {"content": s, "special": True} for s, i in special_ids.items()},
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1024,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    config |= {
        "model_type": "kimi_k2",
        "architectures": ["DeepseekV3ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
        },
        "bos_token_id": special_ids["[BOS]"],
        "eos_token_id": special_ids["[EOS]"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": special_ids["[BOS]"], "eos_token_id": special_ids["<|im_end|>"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    for file in ("configuration_deepseek.py", "tokenization_kimi.py"):
        shutil.copy(CODE / file, out / file)
    return out
