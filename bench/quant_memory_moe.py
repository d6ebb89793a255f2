"""Peak memory of `slimquant quantize` on random DeepSeek-V3-shaped (MLA + MoE) checkpoints that differ only in
the number of routed experts (64, 128, 256 by default), at the same expert size.

Routed experts are calibrated and quantized a group at a time (slimquant/quant/expert_stream.py, --expert-memory),
so peak memory should not grow with their number: the goal is the largest run within 1.2x of the smallest, and
below the size of one float MoE layer. Two decoder layers (one dense, one MoE), a fresh subprocess per run, peak
RSS read from /proc (VmHWM) as bench/quant_memory.py does.

    .venv/bin/python bench/quant_memory_moe.py [--hidden 2048] [--experts 64 128 256] [--type w8a8_dynamic]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from quant_memory import quantize_in_child, random_tensor
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
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3MLP

    with torch.device("meta"):
        config = DeepseekV3Config(**cfg)
        layer = DeepseekV3DecoderLayer(config, layer_idx=i)
        unfuse_experts(layer, DeepseekV3MLP, config)
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
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--type", default="w8a8_dynamic")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--tmp", default=None, help="parent of the temporary folder [system temp]")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="quant-mem-moe-", dir=args.tmp) as tmp:
        for experts in args.experts:
            src = Path(tmp) / f"src-{experts}"
            write_checkpoint(src, args.hidden, 2, experts, args.vocab)
            moe_bytes = (src / "model-00003-of-00004.safetensors").stat().st_size  # layer 1: the MoE layer
            peak, secs, _ = quantize_in_child(src, Path(tmp) / f"out-{experts}", args)
            rows.append((experts, moe_bytes, peak, secs))
            shutil.rmtree(src)
            print(f"{experts} experts: done in {secs:.0f} s", file=sys.stderr, flush=True)
    print_rows(rows, args)


def print_rows(rows: list[tuple[int, int, int, float]], args) -> None:
    gib = 1024**3
    print(f"quantize --type {args.type}, calibration {args.num_samples} x {args.seq_len} tokens, hidden {args.hidden}, "
          "--expert-memory 1GiB (default)")  # fmt: skip
    print(
        "{:>8} {:>20} {:>13} {:>18} {:>7}".format(
            "experts", "MoE layer GiB (bf16)", "peak RSS GiB", "peak / smallest's", "time s"
        )
    )
    for experts, moe, peak, secs in rows:
        print(f"{experts:>8} {moe / gib:>20.2f} {peak / gib:>13.2f} {peak / rows[0][2]:>18.2f} {secs:>7.0f}")
    print(f"largest / smallest peak: {rows[-1][2] / rows[0][2]:.2f}x (goal <= 1.2)")
    print(f"largest run's peak below its MoE layer: {'yes' if rows[-1][2] < rows[-1][1] else 'no'} (goal: yes)")


if __name__ == "__main__":
    main()
