"""`slimquant bench`: decode and prefill speed of models side by side, measured in the same run."""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

COLUMNS = ("decode, 1 stream", "prefill", "decode, N streams")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the bench sub-command."""
    p = sub.add_parser(
        "bench",
        help="tokens/s of models side by side (decode 1 stream, prefill, decode N streams)",
        description="Measure each MODEL in this process, one after another: greedy decode of one stream, one "
        "prefill of --prompt-len tokens, and --streams concurrent streams decoding --decode-tokens each. "
        "Ratios are against the first row (the baseline), measured in the same run.\n\n"
        "example: slimquant bench out/float out/w8a8-dynamic --transformers",
    )
    p.add_argument("models", nargs="+", help="model folders, or 'SmolLM2-135M-Instruct'; the first is the baseline")
    p.add_argument("--transformers", action="store_true", help="add a transformers row for the first model")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill length in tokens (default 512)")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens per decode stream (default 128)")
    p.add_argument("--streams", type=int, default=16, help="concurrent decode streams (default 16)")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    p.set_defaults(func=run)


@dataclass
class Row:
    """tokens/s of one system in each column."""

    name: str
    speeds: tuple[float, float, float]


def run(args: argparse.Namespace) -> int:
    """Measure and print the table."""
    from slimquant import zoo

    if min(args.prompt_len, args.decode_tokens, args.streams) < 1:
        raise ValueError("--prompt-len, --decode-tokens and --streams must be at least 1")
    paths = [str(zoo.resolve_model(m)) for m in args.models]
    rows = []
    for p in paths:
        rows.append(_bench_slimquant(p, args))
        gc.collect()  # free one engine (weights, KV cache) before the next
    if args.transformers:
        rows.insert(0, _bench_transformers(paths[0], args))
    _print(rows, args)
    return 0


def _tokens_per_s(n_tokens: int, fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return n_tokens / (time.perf_counter() - start)


def _bench_slimquant(path: str, args: argparse.Namespace) -> Row:
    from slimquant import LLM, SamplingParams

    max_len = args.prompt_len + args.decode_tokens + 16
    llm = LLM(
        model=path,
        dtype=args.dtype,
        max_model_len=max_len,
        max_num_seqs=max(args.streams, 1),
        max_num_batched_tokens=max(args.prompt_len, 512),
        enable_prefix_caching=False,
    )
    prompt = list(range(100, 100 + args.prompt_len))
    decode = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def gen(prompts, params):
        return llm.generate(prompts, params, use_tqdm=False)

    gen([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    d1 = _tokens_per_s(args.decode_tokens, lambda: gen([[1, 2, 3]], decode))
    pf = _tokens_per_s(args.prompt_len, lambda: gen([prompt], one))
    streams = [[1, 2, 3 + i] for i in range(args.streams)]
    dn = _tokens_per_s(args.decode_tokens * args.streams, lambda: gen(streams, decode))
    return Row(f"slimquant {_short(path)}", (d1, pf, dn))


def _bench_transformers(path: str, args: argparse.Namespace) -> Row:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    n = args.decode_tokens

    def generate(ids: torch.Tensor, new: int) -> None:
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        generate(torch.tensor([[1, 2, 3]]), 2)  # warm-up
        d1 = _tokens_per_s(n, lambda: generate(torch.tensor([[1, 2, 3]]), n))
        pf = _tokens_per_s(args.prompt_len, lambda: model(torch.arange(100, 100 + args.prompt_len)[None]))
        batch = torch.tensor([[1, 2, 3 + i] for i in range(args.streams)])
        dn = _tokens_per_s(n * args.streams, lambda: generate(batch, n))
    return Row(f"transformers {model.dtype} {_short(path)}".replace("torch.", ""), (d1, pf, dn))


def _short(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1][-36:]


def _print(rows: list[Row], args: argparse.Namespace) -> None:
    heads = (
        f"decode 1 x {args.decode_tokens}",
        f"prefill {args.prompt_len}",
        f"decode {args.streams} x {args.decode_tokens}",
    )
    print(f"\ntokens/s (x = ratio to the first row, same run)\n{'system':<52}" + "".join(f"{h:>24}" for h in heads))
    base = rows[0].speeds
    for r in rows:
        cells = "".join(f"{s:>14.1f} ({s / b:>5.2f}x)" for s, b in zip(r.speeds, base, strict=True))
        print(f"{r.name:<52}{cells}")
