"""What tensor_parallel_order changes: one process vs 3 ranks in "exact" and "vllm-ascend" order, in one run.

SmolLM2-135M-Instruct (9 heads, 3 kv heads: splits in 3) quantized to W8A8 and W8A8_DYNAMIC (cached). Each row
starts its ranks as torchrun would (slimquant.distributed.launch.run_ranks) on the torch-reference backend and
reports rank 0 (every rank returns the same); one process on the cpu-native backend (fp32 activations, other
kernels: the same math rounded another valid way) shows how far such rounding alone moves SmolLM2. Columns:
perplexity of --windows windows of --window tokens of the offline text (each window's ratio to one process's, the
mean and the range over windows), and greedy completions of --prompts prompts (--max-tokens tokens): how many are
identical to one process's, and the mean length of the common prefix.

    .venv/bin/python bench/tp_order.py [--windows 4] [--window 256] [--prompts 8] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speed import quantized  # noqa: E402
from slimquant import zoo  # noqa: E402
from slimquant.distributed.launch import run_ranks  # noqa: E402

TEXT = Path(__file__).resolve().parents[1] / "slimquant" / "data" / "pride_and_prejudice_ch1-15.txt"
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Mr. Darcy walked into the room and",
    "The three primary colours are",
    "Once upon a time, in a small village,",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
]


def measure(
    rank: int, size: int, path: str, order: str, args: argparse.Namespace, backend: str = "torch-reference"
) -> dict:
    """Perplexity of each window and greedy completions, from this rank's engine."""
    from slimquant import LLM, SamplingParams

    llm = LLM(path, tensor_parallel_size=size, tensor_parallel_order=order, kernels={"backend": backend},
              max_model_len=args.window + 8)  # fmt: skip
    ids = llm.get_tokenizer()(TEXT.read_text())["input_ids"]
    windows = [ids[i * args.window : (i + 1) * args.window] for i in range(args.windows)]
    score = SamplingParams(max_tokens=1, prompt_logprobs=0)
    ppl = []
    for out in llm.generate([{"prompt_token_ids": w} for w in windows], score, use_tqdm=False):
        logprobs = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:], strict=True)]
        ppl.append(math.exp(-sum(logprobs) / len(logprobs)))
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate(PROMPTS[: args.prompts], greedy, use_tqdm=False)
    return dict(ppl=ppl, tokens=[o.outputs[0].token_ids for o in outs])


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=3, help="ranks (a divisor of 9 heads and 3 kv heads)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    src = zoo.resolve_model("SmolLM2-135M-Instruct")
    print(f"SmolLM2-135M-Instruct, {args.windows} windows x {args.window} tokens, {args.prompts} greedy prompts x "
          f"{args.max_tokens} tokens, torch-reference, {args.size} ranks")  # fmt: skip
    print(f"{'scheme':<14}{'run':<24}{'ppl mean':>9}{'ppl / 1 process [range]':>30}{'same text':>11}{'prefix':>8}")
    for scheme in ("w8a8", "w8a8_dynamic"):
        path = str(quantized(src, scheme))
        (one,) = run_ranks(measure, 1, path, "exact", args, timeout=1800)
        (native,) = run_ranks(measure, 1, path, "exact", args, "cpu-native", timeout=1800)
        runs = [("1 process", one), ("1 process, cpu-native", native)]  # another valid rounding: the noise floor
        for order in ("exact", "vllm-ascend"):
            ranks = run_ranks(measure, args.size, path, order, args, timeout=1800)
            assert all(r == ranks[0] for r in ranks), f"{order}: the ranks disagree"
            runs.append((f"{args.size} ranks, {order}", ranks[0]))
        for name, r in runs:
            ratios = [p / q for p, q in zip(r["ppl"], one["ppl"], strict=True)]
            same = sum(a == b for a, b in zip(r["tokens"], one["tokens"], strict=True))
            prefix = statistics.mean(common_prefix(a, b) for a, b in zip(r["tokens"], one["tokens"], strict=True))
            print(f"{scheme:<14}{name:<24}{statistics.mean(r['ppl']):9.3f}"
                  f"{statistics.mean(ratios):12.4f} [{min(ratios):.4f}-{max(ratios):.4f}]"
                  f"{same:>7}/{len(one['tokens']):<3}{prefix:8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
