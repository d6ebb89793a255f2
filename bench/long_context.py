"""The KV cache's dtype at long contexts: fp32, bf16 and int8 (C8) caches of one checkpoint, side by side.

The checkpoint is --model quantized to --scheme with int8 KV-cache scales (`--kv-cache int8`, cached); the fp32
and bf16 rows run the same checkpoint with kv_cache_dtype="float32" / "bfloat16", which leave the scales unused.

Speed: single-stream greedy decode of --decode-tokens tokens after a prompt of each context length (the prefill
untimed), the three engines in one process, runs alternating; medians over --rounds runs, [min-max] beside them,
and each ratio of two caches' speeds as the median of the per-round ratios [min-max].

Accuracy: the book cut into windows of each context length, each window scored in 64-token prefill chunks, so
that every chunk after the first attends to the earlier ones through the cache (the first chunk of a prompt
attends to its own float k / v in every row, as vLLM-Ascend does). Perplexity per cache, and its change against
fp32 as the mean of the per-window changes of log perplexity, +- its standard error over the windows.

    .venv/bin/python bench/long_context.py [--model SmolLM2-135M-Instruct] [--contexts 512 2048]
        [--decode-tokens 32] [--rounds 5] [--ppl-tokens 0 (all of the book)]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speed import add_model_args, quantized  # noqa: E402
from slimquant import LLM, SamplingParams, zoo  # noqa: E402
from slimquant.format.checkpoint import is_modelslim_dir, kv_cache_int8, read_description  # noqa: E402

KV_DTYPES = ("float32", "bfloat16", "int8")
SHORT = {"float32": "fp32", "bfloat16": "bf16", "int8": "int8"}
CHUNK = 64  # prefill tokens per step in the accuracy runs


def c8_model(args: argparse.Namespace) -> Path:
    """--model if it is an ascend checkpoint with int8 KV-cache scales, else --model quantized to --scheme with
    them (cached)."""
    path = zoo.resolve_model(args.model)
    if is_modelslim_dir(path):
        if not kv_cache_int8(read_description(path)):
            raise SystemExit(f"{path} has no int8 KV-cache scales: pass its float model, or one quantized with them")
        return path
    return quantized(path, args.scheme, kv_cache="int8", suffix="c8")


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


def window_nlls(path: Path, kv_dtype: str, windows: list[list[int]]) -> list[float]:
    """Mean negative log-likelihood of each window, scored in CHUNK-token prefill chunks through the cache."""
    llm = LLM(
        str(path), max_model_len=max(map(len, windows)) + 8, max_num_batched_tokens=CHUNK, max_num_seqs=4,
        enable_prefix_caching=False, kv_cache_dtype=kv_dtype,
    )  # fmt: skip
    outs = llm.generate(
        [{"prompt_token_ids": w} for w in windows], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )
    nlls = []
    for out, ids in zip(outs, windows, strict=True):
        scores = [row[t].logprob for row, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
        nlls.append(-sum(scores) / len(scores))
    return nlls


def speed_table(llms: dict[str, LLM], ids: list[int], args: argparse.Namespace) -> None:
    print(f"\nsingle-stream greedy decode of {args.decode_tokens} tokens: medians of {args.rounds} alternating runs")
    pairs = (("bfloat16", "float32"), ("int8", "float32"), ("int8", "bfloat16"))
    names = [f"{SHORT[a]} / {SHORT[b]}" for a, b in pairs]
    print("| context | " + " | ".join([f"KV {kv} (tokens/s)" for kv in KV_DTYPES] + names) + " |")
    print("|---:|" + "---:|" * (len(KV_DTYPES) + len(pairs)))
    for ctx in args.contexts:
        rates: dict[str, list[float]] = {kv: [] for kv in KV_DTYPES}
        for _ in range(args.rounds):
            for kv, llm in llms.items():
                rates[kv].append(decode_rate(llm, ids[:ctx], args.decode_tokens)[0])
        cells = [f"{statistics.median(r):.1f} [{min(r):.1f}-{max(r):.1f}]" for r in rates.values()]
        ratios = []
        for a, b in pairs:
            per_round = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
            ratios.append(f"{statistics.median(per_round):.2f}x [{min(per_round):.2f}-{max(per_round):.2f}]")
        print(f"| {ctx} | " + " | ".join(cells + ratios) + " |", flush=True)


def accuracy_table(path: Path, ids: list[int], args: argparse.Namespace) -> None:
    print(f"\nperplexity of the book in windows, each scored in {CHUNK}-token chunks through the cache")
    print("| context | windows | " + " | ".join(f"KV {kv}" for kv in KV_DTYPES) + " | bf16 vs fp32 | int8 vs fp32 |")
    print("|---:|---:|" + "---:|" * (len(KV_DTYPES) + 2))
    for ctx in args.contexts:
        windows = [ids[i : i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]
        nlls = {kv: window_nlls(path, kv, windows) for kv in KV_DTYPES}
        cells = [f"{math.exp(statistics.fmean(v)):.3f}" for v in nlls.values()]
        for kv in ("bfloat16", "int8"):
            diffs = [a - b for a, b in zip(nlls[kv], nlls["float32"], strict=True)]  # change of log perplexity
            err = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
            cells.append(f"{statistics.fmean(diffs) * 100:+.2f}% +- {err * 100:.2f}%")
        print(f"| {ctx} | {len(windows)} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ppl-tokens", type=int, default=0, help="book tokens of the accuracy table (0: all; -1: skip)")
    args = ap.parse_args()
    path = c8_model(args)
    longest = max(args.contexts) + args.decode_tokens + 2
    llms = {
        kv: LLM(str(path), max_model_len=longest, enable_prefix_caching=False, kv_cache_dtype=kv) for kv in KV_DTYPES
    }
    ids = llms["float32"].get_tokenizer()(zoo.DEV_TEXT.read_text()).input_ids  # the book
    print(f"{path.name} ({len(ids)} book tokens)")
    speed_table(llms, ids, args)
    del llms
    if args.ppl_tokens >= 0:
        accuracy_table(path, ids[: args.ppl_tokens or None], args)


if __name__ == "__main__":
    main()
