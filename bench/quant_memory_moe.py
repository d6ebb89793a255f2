"""Peak memory of `slimquant quantize` on random DeepSeek-V3-shaped (MLA + MoE) checkpoints that differ only in
the number of routed experts (64, 128, 256 by default), at the same expert size.

Routed experts are calibrated and quantized a group at a time (slimquant/quant/expert_stream.py, --expert-memory),
so peak memory should not grow with their number: the goal is the largest run within 1.2x of the smallest, and
below the size of one float MoE layer. Two decoder layers (one dense, one MoE), a fresh subprocess per run, peak
RSS read from /proc (VmHWM) as bench/quant_memory.py does. `--source bf16 int4` also quantizes each model from
the int4 release Kimi-K2-Thinking's layout makes of it (routed experts packed int4 in groups of 32, as
compressed-tensors stores them), beside the bf16 one.

    .venv/bin/python bench/quant_memory_moe.py [--hidden 2048] [--experts 64 128 256] [--type w8a8_dynamic]
        [--source bf16 [int4]]
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


def write_checkpoint(out: Path, hidden: int, layers: int, experts: int, vocab: int, source: str = "bf16") -> int:
    """A random DeepSeek-V3-shaped folder, one shard per layer, all bf16 or (source "int4") with the routed experts
    packed int4 as Kimi-K2-Thinking stores them; returns its weight bytes."""
    out.mkdir(parents=True)
    cfg = deepseek_config(hidden, layers, experts, vocab)
    if source == "int4":
        cfg |= {"model_type": "kimi_k2", "quantization_config": INT4_EXPERTS}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    make_tokenizer().save_pretrained(out)
    shards = [{"model.embed_tokens.weight": (vocab, hidden)}]
    shards += [{f"model.layers.{n}.{k}": s for k, s in layer_shapes(cfg, n).items()} for n in range(layers)]
    shards += [{"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}]
    for n, shapes in enumerate(shards, 1):
        tensors = {}
        for k, s in shapes.items():
            tensors |= packed_int4(k, s) if source == "int4" and ".experts." in k else {k: random_tensor(s)}
        save_file(tensors, str(out / f"model-{n:05d}-of-{len(shards):05d}.safetensors"))
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


GROUP = 32
INT4_EXPERTS = {  # Kimi-K2-Thinking's quantization_config: int4 routed experts, a bf16 scale per 32 columns
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP},
        }
    },
}


def packed_int4(name: str, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A random weight [M, N] as compressed-tensors packs int4 (any int32 word is 8 valid ints), with its scales."""
    m, n = shape
    base = name.removesuffix("weight")
    scale = (torch.rand(m, n // GROUP) * 0.002 + 0.001).to(torch.bfloat16)  # ints of up to 7 -> up to about 0.02
    words = torch.randint(-(2**31), 2**31, (m, n // 8), dtype=torch.int64).to(torch.int32)
    return {base + "weight_packed": words, base + "weight_scale": scale, base + "weight_shape": torch.tensor([m, n])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--type", default="w8a8_dynamic")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--tmp", default=None, help="parent of the temporary folder [system temp]")
    p.add_argument("--source", nargs="+", choices=("bf16", "int4"), default=["bf16"], help="the sources to quantize")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="quant-mem-moe-", dir=args.tmp) as tmp:
        for experts in args.experts:
            for source in args.source:  # side by side, each model's sources one after the other
                src = Path(tmp) / f"src-{experts}-{source}"
                write_checkpoint(src, args.hidden, 2, experts, args.vocab, source)
                moe_bytes = (src / "model-00003-of-00004.safetensors").stat().st_size  # layer 1: the MoE layer
                peak, secs, _ = quantize_in_child(src, Path(tmp) / f"out-{experts}-{source}", args)
                rows.append((experts, source, moe_bytes, peak, secs))
                shutil.rmtree(src)
                shutil.rmtree(Path(tmp) / f"out-{experts}-{source}")
                print(f"{experts} experts from {source}: done in {secs:.0f} s", file=sys.stderr, flush=True)
    print_rows(rows, args)


def print_rows(rows: list[tuple[int, str, int, int, float]], args) -> None:
    gib = 1024**3
    print(f"quantize --type {args.type}, calibration {args.num_samples} x {args.seq_len} tokens, hidden {args.hidden}, "
          "--expert-memory 1GiB (default)")  # fmt: skip
    print(
        "{:>8} {:>7} {:>20} {:>13} {:>18} {:>7}".format(
            "experts", "source", "MoE layer GiB (disk)", "peak RSS GiB", "peak / smallest's", "time s"
        )
    )
    for source in args.source:
        mine = [r for r in rows if r[1] == source]
        for experts, _, moe, peak, secs in mine:
            print(f"{experts:>8} {source:>7} {moe / gib:>20.2f} {peak / gib:>13.2f} {peak / mine[0][3]:>18.2f} "
                  f"{secs:>7.0f}")  # fmt: skip
        print(f"{source}: largest / smallest peak {mine[-1][3] / mine[0][3]:.2f}x (goal <= 1.2)")
    largest = [r for r in rows if r[0] == rows[-1][0]]
    print(f"largest model's peaks below its MoE layer as {largest[0][1]} ({largest[0][2] / gib:.2f} GiB): "
          f"{'yes' if all(r[3] < largest[0][2] for r in largest) else 'no'} (goal: yes)")  # fmt: skip


if __name__ == "__main__":
    main()
