"""Peak memory of `slimquant quantize` on two random DeepSeek-V3-shaped (MLA + MoE) checkpoints, 4x apart in
routed experts x layers.

Memory should follow one decoder layer (its routed experts included), not the model. Same method as
bench/quant_memory.py (whose child runner and table this reuses): one shard per layer, a fresh subprocess per run.

    .venv/bin/python bench/quant_memory_moe.py [--hidden 1024] [--experts 16 32] [--layers 4 8] [--type w8a8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from quant_memory import print_table, quantize_in_child, random_tensor
from safetensors.torch import save_file

from slimquant.quant.moe import unfuse_experts
from slimquant.random_models import make_tokenizer


def deepseek_config(hidden: int, layers: int, experts: int, vocab: int) -> dict:
    """DeepSeek-V3's proportions at a smaller hidden size: MLA with q/kv LoRA, 1 dense layer, grouped top-k."""
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers,
        first_k_dense_replace=1,
        n_routed_experts=experts,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        q_lora_rank=hidden // 2,
        kv_lora_rank=hidden // 4,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=64,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    return cfg.to_dict()


def layer_shapes(cfg: dict, i: int) -> dict[str, tuple[int, ...]]:
    """Relative name -> shape of decoder layer i's tensors, routed experts per expert (the checkpoint layout)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    with torch.device("meta"):
        layer = DeepseekV3DecoderLayer(DeepseekV3Config(**cfg), layer_idx=i)
        unfuse_experts(layer)
    return {k: tuple(v.shape) for k, v in layer.state_dict().items()}


def write_checkpoint(out: Path, hidden: int, layers: int, experts: int, vocab: int) -> int:
    """A random bf16 DeepSeek-V3-shaped folder, one shard per layer; returns its weight bytes."""
    out.mkdir(parents=True)
    cfg = deepseek_config(hidden, layers, experts, vocab)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    make_tokenizer().save_pretrained(out)
    shards = [{"model.embed_tokens.weight": (vocab, hidden)}]
    shards += [{f"model.layers.{n}.{k}": s for k, s in layer_shapes(cfg, n).items()} for n in range(layers)]
    shards += [{"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}]
    for n, shapes in enumerate(shards, 1):
        tensors = {k: random_tensor(s) for k, s in shapes.items()}
        save_file(tensors, str(out / f"model-{n:05d}-of-{len(shards):05d}.safetensors"))
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, nargs=2, default=(16, 32), metavar=("SMALL", "LARGE"))
    p.add_argument("--layers", type=int, nargs=2, default=(4, 8), metavar=("SMALL", "LARGE"))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--type", default="w8a8")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--tmp", default=None, help="parent of the temporary folder [system temp]")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="quant-mem-moe-", dir=args.tmp) as tmp:
        for name, layers, experts in zip(("small", "large"), args.layers, args.experts, strict=True):
            src = Path(tmp) / f"{name}-src"
            float_bytes = write_checkpoint(src, args.hidden, layers, experts, args.vocab)
            peak, secs, out_bytes = quantize_in_child(src, Path(tmp) / f"{name}-out", args)
            rows.append((name, layers, float_bytes, out_bytes, peak, secs))
            print(f"{name}: done in {secs:.0f} s", file=sys.stderr, flush=True)
    print(f"routed experts per MoE layer: small {args.experts[0]}, large {args.experts[1]}")
    print_table(rows, args)


if __name__ == "__main__":
    main()
