"""Speed table of issue 7: transformers vs slimquant float / W8A8_DYNAMIC / W8A8, measured in one run.

Rows for SmolLM2-135M-Instruct (the built-in model; quantized copies cached in $SLIMQUANT_CACHE) and, with
--large, for a random-weight model of Qwen2.5-1.5B's shape (built once, cached). Columns: decode of one
stream, prefill of --prompt-len tokens, decode of --streams streams (tokens/s, ratio to the first row), then
each model's decode speed against the memory-bandwidth limit measured in the same run.

    .venv/bin/python bench/speed.py [--large] [--decode-tokens 64] [--streams 16] [--prompt-len 512]

Run it on a quiet machine: with 2 OpenMP threads, any other busy process stalls every parallel op.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimquant import quantize, zoo  # noqa: E402
from slimquant.entrypoints.commands import bench  # noqa: E402
from slimquant.random_models import make_tiny_model  # noqa: E402

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


def quantized(src: Path, qtype: str, **kw) -> Path:
    """src quantized to qtype, cached next to the other cached models."""
    dst = zoo.cache_dir() / "bench" / f"{src.name}-{qtype}"
    if not (dst / "quant_model_description.json").is_file():
        print(f"quantizing {src.name} to {qtype} -> {dst}", flush=True)
        quantize(src, dst, qtype, overwrite=True, progress=False, **kw)
    return dst


def qwen25_shape_model() -> Path:
    """A random bf16 model with Qwen2.5-1.5B's shapes (speed does not depend on the weights' values)."""
    out = zoo.cache_dir() / "bench" / "qwen2.5-1.5b-shape-random-bf16"
    if not (out / "config.json").is_file():
        print(f"building {out} (random weights)", flush=True)
        make_tiny_model("qwen2", out, dtype=torch.bfloat16, **QWEN25_15B_SHAPE)
    return out


def table(src: Path, args: argparse.Namespace, **quant_kw) -> None:
    """transformers bf16, slimquant float, W8A8_DYNAMIC and W8A8 of one source model."""
    paths = [str(src)] + [str(quantized(src, t, **quant_kw)) for t in ("w8a8_dynamic", "w8a8")]
    print(f"\n### {src.name}", flush=True)
    bench.print_table(bench.measure(paths, args, transformers=args.transformers), args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--large", action="store_true", help="add the Qwen2.5-1.5B-shaped table")
    p.add_argument("--only-large", action="store_true", help="only the Qwen2.5-1.5B-shaped table")
    p.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True, help="transformers rows")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=True, help="llama.cpp row (SmolLM2)")
    args = p.parse_args()
    args.gguf = None  # the llama.cpp row: made for SmolLM2 only
    print(bench.machine_line())
    if not args.only_large:
        table(zoo.default_model_dir(), args)
    if args.large or args.only_large:
        # random weights: calibration quality is moot, keep it quick
        table(qwen25_shape_model(), args, num_samples=4, seq_len=64, alpha=0.5, rounding="nearest")


if __name__ == "__main__":
    main()
