"""Peak memory of `slimquant quantize` on two random llama checkpoints whose sizes differ about 4x.

Memory should follow one decoder layer, not the model: the goal is peak(large) / peak(small) <= 1.3 and
a peak below the float checkpoint's size. Checkpoints are written tensor by tensor (one shard per layer)
under a temporary folder, quantized each in a fresh subprocess, and removed afterwards.

    .venv/bin/python bench/quant_memory.py [--hidden 2048] [--layers 8 42] [--type w8a8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from slimquant.random_models import make_tokenizer


def llama_config(hidden: int, layers: int, vocab: int) -> dict:
    """A TinyLlama-like shape: intermediate 2.75x hidden, 128-wide heads, 4 kv heads."""
    from transformers import LlamaConfig

    heads = hidden // 128
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    return cfg.to_dict()


def layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Relative name -> shape of one decoder layer's tensors."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }


def random_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) == 1:
        return (1.0 + 0.1 * torch.randn(shape)).to(torch.bfloat16)
    return (0.02 * torch.randn(shape)).to(torch.bfloat16)


def write_checkpoint(out: Path, hidden: int, layers: int, vocab: int) -> int:
    """A random bf16 llama folder, one shard per layer; returns its weight bytes."""
    out.mkdir(parents=True)
    cfg = llama_config(hidden, layers, vocab)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    make_tokenizer().save_pretrained(out)
    shards = [{"model.embed_tokens.weight": (vocab, hidden)}]
    shards += [{f"model.layers.{n}.{k}": s for k, s in layer_shapes(cfg).items()} for n in range(layers)]
    shards += [{"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}]
    weight_map, total = {}, 0
    for n, shapes in enumerate(shards, 1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: random_tensor(s) for k, s in shapes.items()}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


# The child reports its own peak (VmHWM: ru_maxrss would inherit the parent's high-water mark across fork/exec).
CHILD = """import sys
from slimquant.entrypoints.cli import main
from slimquant.quant.memory import peak_rss_bytes
rc = main(sys.argv[1:])
print("VmHWM_kB", peak_rss_bytes() // 1024)
sys.exit(rc)
"""


def quantize_in_child(src: Path, dst: Path, args, extra: tuple[str, ...] = ()) -> tuple[int, float, int]:
    """Run the CLI in a fresh process (extra: more of its arguments); returns (peak RSS bytes, seconds, output
    bytes)."""
    cmd = [sys.executable, "-c", CHILD, "quantize", str(src), str(dst), "--type", args.type]
    cmd += ["--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len), "--no-progress", *extra]
    start = time.perf_counter()
    child = subprocess.run(cmd, capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"quantize failed ({child.returncode}):\n{child.stdout}{child.stderr}")
    peak_kb = int(child.stdout.split("VmHWM_kB")[-1].split()[0])
    out_bytes = sum(f.stat().st_size for f in dst.iterdir())
    return peak_kb * 1024, time.perf_counter() - start, out_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, nargs=2, default=(8, 42), metavar=("SMALL", "LARGE"))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--type", default="w8a8")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--tmp", default=None, help="parent of the temporary folder [system temp]")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="quant-mem-", dir=args.tmp) as tmp:
        for name, layers in zip(("small", "large"), args.layers, strict=True):
            src = Path(tmp) / f"{name}-src"
            float_bytes = write_checkpoint(src, args.hidden, layers, args.vocab)
            peak, secs, out_bytes = quantize_in_child(src, Path(tmp) / f"{name}-out", args)
            rows.append((name, layers, float_bytes, out_bytes, peak, secs))
            print(f"{name}: done in {secs:.0f} s", file=sys.stderr, flush=True)
    print_table(rows, args)


def print_table(rows, args) -> None:
    gib = 1024**3
    print(f"quantize --type {args.type}, calibration {args.num_samples} x {args.seq_len} tokens, hidden {args.hidden}")
    head = ("model", "layers", "float GiB", "out GiB", "peak RSS GiB", "peak/float", "time s")
    print("{:<6} {:>6} {:>10} {:>8} {:>13} {:>11} {:>7}".format(*head))
    for name, layers, fb, ob, peak, secs in rows:
        cells = (name, layers, fb / gib, ob / gib, peak / gib, peak / fb, secs)
        print("{:<6} {:>6} {:>10.2f} {:>8.2f} {:>13.2f} {:>11.2f} {:>7.0f}".format(*cells))
    (_, _, fs, _, ps, _), (_, _, fl, _, pl, _) = rows
    print(f"float size ratio large/small: {fl / fs:.2f}x")
    print(f"peak RSS ratio large/small:   {pl / ps:.2f}x (goal <= 1.3)")
    print(f"peak below float size:        {'yes' if all(r[4] < r[2] for r in rows) else 'no'} (goal: yes)")


if __name__ == "__main__":
    main()
