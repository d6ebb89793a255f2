"""Speed table of issue 7: transformers vs slimquant float / W8A8_DYNAMIC / W8A8, measured in one run.

Rows for SmolLM2-135M-Instruct (the built-in model; quantized copies cached in $SLIMQUANT_CACHE) and, with
--large, for a random-weight model of Qwen2.5-1.5B's shape (built once, cached). Columns: decode of one
stream, prefill of --prompt-len tokens, decode of --streams streams (tokens/s, ratio to the first row), then
each model's decode speed against the memory-bandwidth limit measured in the same run.

    .venv/bin/python bench/speed.py [--large] [--decode-tokens 64] [--streams 16] [--prompt-len 512]
    python bench/speed.py --device cuda --random --large   # on a GPU machine without the model files

Run it on a quiet machine: with 2 OpenMP threads, any other busy process stalls every parallel op.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimquant import quantize, zoo  # noqa: E402
from slimquant.devices import check_device  # noqa: E402
from slimquant.entrypoints.commands import bench  # noqa: E402
from slimquant.random_models import make_tiny_model  # noqa: E402

SMOLLM2_135M_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
QWEN25_05B_SHAPE = dict(  # 14 heads and 2 kv heads: splits over 2 tensor-parallel ranks (bench/parallel.py)
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
QWEN25_15B_SHAPE = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def quantized(src: Path, qtype: str, suffix: str = "", **kw) -> Path:
    """src quantized to qtype with quantize()'s keywords kw (a suffix naming them), cached with the other models."""
    dst = zoo.cache_dir() / "bench" / f"{src.name}-{qtype}{'-' + suffix if suffix else ''}"
    if not (dst / "quant_model_description.json").is_file():
        print(f"quantizing {src.name} to {qtype} -> {dst}", flush=True)
        quantize(src, dst, qtype, overwrite=True, progress=False, **kw)
    return dst


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--model (a folder or the built-in name) and --scheme (what a float model is quantized to, cached)."""
    ap.add_argument("--model", default="SmolLM2-135M-Instruct", help="a model folder or the built-in name")
    ap.add_argument("--scheme", default="w8a8_dynamic", help="quantize a float --model to this (cached)")


def int8_model(args: argparse.Namespace) -> Path:
    """The --model folder if it holds an ascend checkpoint, else --model quantized to --scheme (cached)."""
    path = zoo.resolve_model(args.model)
    return path if (path / "quant_model_description.json").is_file() else quantized(path, args.scheme)


def random_model(arch: str, name: str, shape: dict) -> Path:
    """A random bf16 model of the given shape, built once (speed does not depend on the weights' values)."""
    out = zoo.cache_dir() / "bench" / f"{name}-shape-random-bf16"
    if not (out / "config.json").is_file():
        print(f"building {out} (random weights)", flush=True)
        make_tiny_model(arch, out, dtype=torch.bfloat16, **shape)
    return out


def table(src: Path, args: argparse.Namespace, **quant_kw) -> None:
    """transformers bf16, slimquant float, W8A8_DYNAMIC and W8A8 of one source model."""
    paths = [str(src)] + [str(quantized(src, t, device=args.device, **quant_kw)) for t in ("w8a8_dynamic", "w8a8")]
    print(f"\n### {src.name}", flush=True)
    bench.print_table(bench.measure(paths, args, transformers=args.transformers), args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--large", action="store_true", help="add the Qwen2.5-1.5B-shaped table")
    p.add_argument("--only-large", action="store_true", help="only the Qwen2.5-1.5B-shaped table")
    bench.add_measure_args(p)
    p.set_defaults(decode_tokens=64)
    p.add_argument("--random", action="store_true", help="SmolLM2-135M's shape with random weights (no model files)")
    args = p.parse_args()
    check_device(args.device)
    print(bench.machine_line(args.device))
    quick = dict(num_samples=4, seq_len=64, alpha=0.5, rounding="nearest")  # random weights: calibration is moot
    if not args.only_large:
        if args.random:
            table(random_model("llama", "smollm2-135m", SMOLLM2_135M_SHAPE), args, **quick)
        else:
            table(zoo.default_model_dir(), args)
    if args.large or args.only_large:
        table(random_model("qwen2", "qwen2.5-1.5b", QWEN25_15B_SHAPE), args, **quick)


if __name__ == "__main__":
    main()
