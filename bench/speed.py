"""Speed table of issues 7 and 21: transformers vs slimquant float / W8A8_DYNAMIC / W8A8, measured in one run.

Rows for SmolLM2-135M-Instruct (the built-in model; quantized copies cached in $SLIMQUANT_CACHE), or with --random
for random checkpoints of its shape; with --large / --7b also for random checkpoints of Qwen2.5-1.5B's / 7B's shape
(random_models.make_random_checkpoint: int8 weights and scales written straight from the shape, no calibration;
built once, cached). Columns: decode of one stream, prefill of --prompt-len tokens, decode of --streams streams
(tokens/s, ratio to the first row), then each model's decode speed against the memory-bandwidth limit measured in
the same run. `--cuda-int8-gemm cublas,triton` adds a row per int8 GEMM, `--isa avx512vnni,amx` a row per native
CPU build.

    .venv/bin/python bench/speed.py [--large] [--decode-tokens 64] [--streams 16] [--prompt-len 512]
    python bench/speed.py --device cuda --random --7b --cuda-int8-gemm cublas,triton   # a GPU machine
    python bench/speed.py --random --7b --prepare   # only write those random checkpoints (CPU and disk)

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
from slimquant.random_models import make_random_checkpoint  # noqa: E402

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


QWEN25_7B_SHAPE = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
QTYPES = ("float", "w8a8_dynamic", "w8a8")


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


def random_checkpoint(arch: str, name: str, shape: dict, qtype: str = "float") -> Path:
    """A random checkpoint of a shape in bf16, or ascend qtype, built once (speed does not depend on the values)."""
    out = zoo.cache_dir() / "bench" / f"{name}-shape-random-{qtype}"
    if not (out / "config.json").is_file():
        print(f"writing {out} (random weights)", flush=True)
        make_random_checkpoint(arch, out, qtype, torch.bfloat16, **shape)
    return out


def random_models(arch: str, name: str, shape: dict) -> list[Path]:
    """random_checkpoint of each of QTYPES."""
    return [random_checkpoint(arch, name, shape, qtype) for qtype in QTYPES]


def table(paths: list[Path], args: argparse.Namespace) -> None:
    """transformers bf16, then slimquant's float and int8 rows of one model shape."""
    print(f"\n### {paths[0].name}", flush=True)
    bench.print_table(bench.measure([str(p) for p in paths], args, transformers=args.transformers), args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--large", action="store_true", help="add the Qwen2.5-1.5B-shaped table")
    p.add_argument("--only-large", action="store_true", help="only the Qwen2.5-1.5B-shaped table")
    p.add_argument("--7b", dest="qwen7b", action="store_true", help="add the Qwen2.5-7B-shaped table (random)")
    p.add_argument("--only-7b", action="store_true", help="only the Qwen2.5-7B-shaped table")
    bench.add_measure_args(p)
    p.set_defaults(decode_tokens=64)
    p.add_argument("--random", action="store_true", help="SmolLM2-135M's shape with random weights (no model files)")
    p.add_argument(
        "--prepare", action="store_true", help="only write the random checkpoints these tables read (no GPU used)"
    )
    args = p.parse_args()
    if not args.prepare:
        check_device(args.device)
        print(bench.machine_line(args.device))

    def show(paths: list[Path]) -> None:
        if not args.prepare:
            table(paths, args)

    if not (args.only_large or args.only_7b):
        if args.random:
            show(random_models("llama", "smollm2-135m", SMOLLM2_135M_SHAPE))
        elif not args.prepare:
            src = zoo.default_model_dir()
            show([src] + [quantized(src, t, device=args.device) for t in QTYPES[1:]])
    if args.large or args.only_large:
        show(random_models("qwen2", "qwen2.5-1.5b", QWEN25_15B_SHAPE))
    if args.qwen7b or args.only_7b:
        show(random_models("qwen2", "qwen2.5-7b", QWEN25_7B_SHAPE))


if __name__ == "__main__":
    main()
