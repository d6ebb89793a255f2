"""What a structured output costs in decode: greedy decoding with a grammar (xgrammar's mask over the whole head)
against plain greedy decoding (the head screen's argmax), one engine, runs alternating, medians with the spread.

The grammar, a regex of lowercase words, lets the model write as many tokens as without it, so the two runs decode
the same number of tokens (ignore_eos).

    .venv/bin/python bench/structured.py [--model SmolLM2-135M-Instruct] [--streams 1 8] [--tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speed import add_model_args, int8_model  # noqa: E402
from slimquant import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402

REGEX = "[a-z]+( [a-z]+)*"  # words and spaces: never complete before max_tokens


def run(llm: LLM, constrained: bool, streams: int, tokens: int) -> float:
    """Decode tokens/s of `streams` greedy requests, with or without the grammar."""
    structured = StructuredOutputsParams(regex=REGEX) if constrained else None
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, structured_outputs=structured)
    prompts = [f"Tell me a story about the number {i}." for i in range(streams)]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
    return streams * tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    path = int8_model(args)
    llm = LLM(str(path), max_model_len=512, enable_prefix_caching=False)
    run(llm, True, 2, 8), run(llm, False, 2, 8)  # warm-up: the screen and xgrammar's tables are built on first use
    print(f"{path.name}: greedy, {args.tokens} tokens per stream, regex {REGEX!r}, {args.rounds} rounds alternating")
    print("| streams | plain (tokens/s) | constrained (tokens/s) | constrained / plain [min, max over rounds] |")
    print("|---:|---:|---:|---:|")
    for streams in args.streams:
        plain, constrained = [], []
        for _ in range(args.rounds):
            plain.append(run(llm, False, streams, args.tokens))
            constrained.append(run(llm, True, streams, args.tokens))
        ratios = [c / p for c, p in zip(constrained, plain, strict=True)]
        p, c = statistics.median(plain), statistics.median(constrained)
        print(f"| {streams} | {p:.1f} | {c:.1f} | {c / p:.2f}x [{min(ratios):.2f}, {max(ratios):.2f}] |", flush=True)


if __name__ == "__main__":
    main()
