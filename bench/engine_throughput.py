"""Offline generation throughput: the batched engine vs the same engine one prompt at a time vs transformers.

A random llama (hidden 256 by default) gets N prompts, greedy, ignore_eos, M new tokens each. Prints
tokens/s of each run and ratios against transformers' `generate` (one prompt at a time, its own KV cache),
measured in the same process; also checks that batched and one-at-a-time outputs are identical.

    .venv/bin/python bench/engine_throughput.py [--prompts 32] [--max-tokens 64] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimquant import LLM, SamplingParams  # noqa: E402
from slimquant.random_models import make_tiny_model  # noqa: E402

WORDS = "the quick brown fox jumps over the lazy dog and my name is Ada the capital of France is Paris".split()  # noqa: SIM905


def prompts(n: int) -> list[str]:
    """n different prompts of 6 to 17 words."""
    return [" ".join(WORDS[i % 7 : i % 7 + 6 + i % 12]) for i in range(n)]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_hf(path: Path, texts: list[str], max_tokens: int) -> list[list[int]]:
    """transformers generate, greedy, one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    outs = []
    with torch.inference_mode():
        for t in texts:
            ids = torch.tensor([tok.encode(t)])
            gen = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            outs.append(gen[0, ids.shape[1] :].tolist())
    return outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(
            "llama", tmp, hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers
        )
        texts = prompts(args.prompts)
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        llm = LLM(str(path), max_model_len=512)
        llm.generate(texts[:2], params, use_tqdm=False)  # warm-up
        batched, t_batch = timed(lambda: llm.generate(texts, params, use_tqdm=False))
        single, t_single = timed(lambda: [llm.generate(t, params, use_tqdm=False)[0] for t in texts])
        hf, t_hf = timed(lambda: run_hf(path, texts, args.max_tokens))
    same = [o.outputs[0].token_ids for o in batched] == [o.outputs[0].token_ids for o in single]
    agree = sum(o.outputs[0].token_ids == h for o, h in zip(batched, hf, strict=True))
    total = args.prompts * args.max_tokens
    print(f"{args.prompts} prompts x {args.max_tokens} tokens, hidden {args.hidden}, {args.layers} layers")
    print(f"{'run':<34}{'seconds':>9}{'tokens/s':>10}{'vs transformers':>17}")
    for name, t in (("transformers generate, one at a time", t_hf), ("slimquant, one at a time", t_single)):
        print(f"{name:<34}{t:>9.2f}{total / t:>10.1f}{t_hf / t:>16.2f}x")
    print(f"{'slimquant, batched':<34}{t_batch:>9.2f}{total / t_batch:>10.1f}{t_hf / t_batch:>16.2f}x")
    print(f"batched == one at a time: {same}; identical to transformers: {agree}/{args.prompts} prompts")


if __name__ == "__main__":
    main()
