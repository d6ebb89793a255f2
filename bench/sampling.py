"""Top-k sampling decode: the sampler over the head screen's candidates against the whole vocabulary, one engine,
runs alternating (medians), the same seeds: the tokens must agree.

    .venv/bin/python bench/sampling.py [--model SmolLM2-135M-Instruct] [--streams 1 16] [--tokens 64] [--rounds 5]
        [--temperature 0.7] [--top-k 40] [--top-p 0.9]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speed import add_model_args, int8_model  # noqa: E402
from slimquant import LLM, SamplingParams  # noqa: E402


def run(llm: LLM, screen: bool, streams: int, args: argparse.Namespace) -> tuple[float, list[list[int]]]:
    """tokens/s and the tokens of `streams` seeded sampling requests, with or without the screen."""
    head = llm.llm_engine.runner.sampler.head  # the cpu-native backend's ScreenedHead
    head.screens = type(head).screens.__get__(head) if screen else (lambda top_k=None: False)
    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_tokens=args.tokens, ignore_eos=True,
        seed=7,
    )  # fmt: skip
    start = time.perf_counter()
    outs = llm.generate([f"Once upon a time {i}" for i in range(streams)], params, use_tqdm=False)
    return streams * args.tokens / (time.perf_counter() - start), [o.outputs[0].token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--top-p", type=float, default=0.9)
    args = ap.parse_args()
    path = int8_model(args)
    llm = LLM(str(path), max_model_len=512, enable_prefix_caching=False)
    run(llm, True, 2, args), run(llm, False, 2, args)  # warm-up (the screen is built on first use)
    print(f"{path.name}: temperature {args.temperature}, top_k {args.top_k}, top_p {args.top_p}, {args.tokens} tokens")
    print("| streams | whole vocabulary (tokens/s) | screen candidates (tokens/s) | ratio | same tokens |")
    print("|---:|---:|---:|---:|---|")
    for streams in args.streams:
        rates: dict[bool, list[float]] = {True: [], False: []}
        tokens: dict[bool, list[list[int]]] = {}
        for _ in range(args.rounds):
            for screen in (False, True):
                rate, tokens[screen] = run(llm, screen, streams, args)
                rates[screen].append(rate)
        full, screened = statistics.median(rates[False]), statistics.median(rates[True])
        same = "yes" if tokens[True] == tokens[False] else "NO"
        print(f"| {streams} | {full:.1f} | {screened:.1f} | {screened / full:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
