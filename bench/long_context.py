"""Single-stream decode at long contexts: the KV cache in fp32 (`kv_cache_dtype="float32"`) against bf16 (the
default for a bf16 checkpoint), both engines in one process, runs alternating, medians reported.

At a 1500-token context a SmolLM2 decode step reads 69 MB of fp32 KV cache besides its 136 MB of weights; bf16
halves the cache. Prints tokens/s per context length and the ratio, and how many of the greedy tokens agree;
then the perplexity of the book's first --ppl-tokens tokens scored in 64-token prefill chunks, each chunk
attending to the earlier ones through the cache (so the cache's rounding counts), under each cache dtype.

    .venv/bin/python bench/long_context.py [--model SmolLM2-135M-Instruct] [--contexts 64 500 1500]
        [--decode-tokens 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speed import add_model_args, int8_model  # noqa: E402
from slimquant import LLM, SamplingParams, zoo  # noqa: E402

KV_DTYPES = ("float32", "bfloat16")


def decode_rate(llm: LLM, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    """tokens/s of the decode steps that make `tokens` greedy tokens after prompt (the prefill steps untimed),
    and the tokens."""
    engine = llm.llm_engine
    engine.add_request(
        "long", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    )
    while not (outs := engine.step()) or not outs[0].outputs[0].token_ids:  # the prefill, in chunks
        pass
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step() or outs
    rate = tokens / (time.perf_counter() - start)
    return rate, list(outs[0].outputs[0].token_ids)


def chunked_perplexity(path: Path, kv_dtype: str, ids: list[int]) -> float:
    """Perplexity of ids scored in 64-token prefill chunks, each reading the earlier chunks from the KV cache."""
    llm = LLM(
        str(path), quantization="ascend", max_model_len=len(ids) + 8, max_num_batched_tokens=64,
        enable_prefix_caching=False, kv_cache_dtype=kv_dtype,
    )  # fmt: skip
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    scores = [row[t].logprob for row, t in zip(out[0].prompt_logprobs[1:], ids[1:], strict=True)]
    return math.exp(-sum(scores) / len(scores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 500, 1500])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ppl-tokens", type=int, default=1024, help="tokens of the perplexity check (0: skip it)")
    args = ap.parse_args()
    path = int8_model(args)
    longest = max(args.contexts) + args.decode_tokens + 2
    llms = {
        kv: LLM(str(path), quantization="ascend", max_model_len=longest, enable_prefix_caching=False, kv_cache_dtype=kv)
        for kv in KV_DTYPES
    }
    ids = llms["float32"].get_tokenizer()(zoo.EVAL_TEXT.read_text()).input_ids  # the book
    print(f"{path.name}, single-stream greedy decode of {args.decode_tokens} tokens, medians of {args.rounds} runs")
    print("| context | KV fp32 (tokens/s) | KV bf16 (tokens/s) | bf16 / fp32 | same tokens |")
    print("|---:|---:|---:|---:|---:|")
    for ctx in args.contexts:
        rates: dict[str, list[float]] = {kv: [] for kv in KV_DTYPES}
        outs: dict[str, list[int]] = {}
        for _ in range(args.rounds):
            for kv, llm in llms.items():
                rate, outs[kv] = decode_rate(llm, ids[:ctx], args.decode_tokens)
                rates[kv].append(rate)
        fp32, bf16 = (statistics.median(rates[kv]) for kv in KV_DTYPES)
        same = sum(a == b for a, b in zip(*outs.values(), strict=True))
        print(f"| {ctx} | {fp32:.1f} | {bf16:.1f} | {bf16 / fp32:.2f}x | {same}/{len(outs['float32'])} |", flush=True)

    if args.ppl_tokens:
        ppl = {kv: chunked_perplexity(path, kv, ids[: args.ppl_tokens]) for kv in KV_DTYPES}
        fp32, bf16 = ppl["float32"], ppl["bfloat16"]
        print(f"perplexity of {args.ppl_tokens} book tokens in 64-token chunks through the cache: ", end="")
        print(f"KV fp32 {fp32:.3f}, KV bf16 {bf16:.3f} ({bf16 / fp32 - 1:+.2%})")


if __name__ == "__main__":
    main()
