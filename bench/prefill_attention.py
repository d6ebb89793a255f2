"""Prefill attention of int8 models on the CPU, fp32 (before) against bf16 over the bf16 KV cache (the default
where the CPU has native bf16), side by side in one run, on SmolLM2-135M-Instruct's W8A8_DYNAMIC and W8A8 copies:

- prefill tokens/s at each --prompt-lens, the two settings alternating on one LLM for --rounds rounds after a
  warm-up (the ratio per round, its median and range);
- perplexity on the same --context-token windows of Persuasion (zoo.EVAL_TEXT, all of it or --max-tokens), each
  window scored once per setting, the change's 95% interval paired by window, and top-1 agreement.

    .venv/bin/python bench/prefill_attention.py [--schemes w8a8_dynamic,w8a8] [--prompt-lens 512,2048] [--rounds 5]

--deepseek times MLA instead (speed only): a model of DeepSeek-V2-Lite's attention and expert shapes with random
weights (3 layers, 16 of its 64 experts), quantized to each scheme; no MLA model with real weights is at hand here.

Run it on a quiet machine: with 2 OpenMP threads, any other busy process stalls every parallel op.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import speed  # noqa: E402

from bench._options import comma_ints  # noqa: E402
from slimquant import LLM, SamplingParams, zoo  # noqa: E402
from slimquant.evaluation import score_window, token_windows  # noqa: E402
from slimquant.format.tokenizer import load_tokenizer  # noqa: E402
from slimquant.kernels.cpu import has_native_half  # noqa: E402
from slimquant.models.loader import kv_cache_dtype, load_model  # noqa: E402
from slimquant.random_models import make_tiny_model  # noqa: E402
from slimquant.stats import change_interval  # noqa: E402

SETTINGS = (False, True)  # bf16_prefill_attention: fp32 first (the baseline)
DEEPSEEK_V2_LITE_SHAPE = dict(  # its attention and expert shapes; fewer layers, experts and tokens
    hidden_size=2048,
    num_attention_heads=16,
    num_key_value_heads=16,
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    n_routed_experts=16,
    num_experts_per_tok=6,
    n_shared_experts=2,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    vocab_size=4096,
    max_position_embeddings=8192,
)


def deepseek_model() -> Path:
    """DEEPSEEK_V2_LITE_SHAPE with random bf16 weights, built once into the cache."""
    out = zoo.cache_dir() / "bench" / "deepseek-v2-lite-shape-random"
    if not (out / "config.json").is_file():
        print(f"writing {out} (random weights)", flush=True)
        make_tiny_model("deepseek_v2", out, torch.bfloat16, **DEEPSEEK_V2_LITE_SHAPE)
    return out


def prefill_speed(path: Path, lengths: list[int], rounds: int) -> list[tuple[int, list[float], list[float]]]:
    """(prompt length, fp32 tokens/s per round, bf16 tokens/s per round) for each length, on one LLM."""
    llm = LLM(
        str(path), max_model_len=max(lengths) + 64, max_num_batched_tokens=max(lengths), enable_prefix_caching=False
    )
    ops = llm.llm_engine.runner.backend.ops
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    rows = []
    for n in lengths:
        prompt = [100 + i % 2000 for i in range(n)]
        times: dict[bool, list[float]] = {s: [] for s in SETTINGS}
        for r in range(rounds + 1):  # round 0 warms up
            for setting in SETTINGS:
                ops.bf16_prefill_attention = setting
                start = time.perf_counter()
                llm.generate([prompt], one, use_tqdm=False)
                if r:
                    times[setting].append(n / (time.perf_counter() - start))
        rows.append((n, times[False], times[True]))
    return rows


def perplexities(path: Path, context: int, max_tokens: int | None) -> tuple[list[float], tuple, float]:
    """(perplexity per setting, the bf16 change's 95% interval, top-1 agreement) on the same windows."""
    lm = load_model(str(path))
    cache = kv_cache_dtype("auto", "auto", lm, "cpu")
    ids = torch.tensor(load_tokenizer(str(path))(zoo.EVAL_TEXT.read_text(encoding="utf-8")).input_ids)
    ids = ids[:max_tokens] if max_tokens else ids
    nlls: dict[bool, list[torch.Tensor]] = {s: [] for s in SETTINGS}
    preds: dict[bool, list[torch.Tensor]] = {s: [] for s in SETTINGS}
    for start, end, first in token_windows(ids.numel(), context, context):
        for setting in SETTINGS:
            lm.backend.ops.bf16_prefill_attention = setting
            nll, pred = score_window(lm, ids[start:end], cache)
            nlls[setting].append(nll[first - start - 1 :].double())
            preds[setting].append(pred[first - start - 1 :])
    means = {s: torch.stack([n.mean() for n in nlls[s]]) for s in SETTINGS}
    ppl = [math.exp(torch.cat(nlls[s]).mean().item()) for s in SETTINGS]
    agree = (torch.cat(preds[True]) == torch.cat(preds[False])).float().mean().item()
    return ppl, change_interval(means[False], means[True]), agree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="w8a8_dynamic,w8a8", help="int8 copies of SmolLM2-135M-Instruct")
    ap.add_argument("--prompt-lens", type=comma_ints, default="512,2048", help="prefill lengths, comma-separated")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per length (after one warm-up)")
    ap.add_argument("--context", type=int, default=512, help="tokens per perplexity window")
    ap.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text (default: all)")
    ap.add_argument("--deepseek", action="store_true", help="speed of a DeepSeek-V2-Lite-shaped model (random)")
    args = ap.parse_args()
    if not has_native_half():
        print("note: this CPU has no native bf16, so the engine keeps fp32 prefill attention; bf16 here is emulated")
    src = deepseek_model() if args.deepseek else zoo.default_model_dir()
    print("| scheme | prompt | fp32 attention, tok/s | bf16 attention, tok/s | bf16 / fp32 per round |")
    print("|---|---:|---:|---:|---:|")
    accuracy = []
    for scheme in args.schemes.split(","):
        path = speed.quantized(src, scheme)
        for n, fp32, bf16 in prefill_speed(path, args.prompt_lens, args.rounds):
            ratios = [b / f for f, b in zip(fp32, bf16, strict=True)]
            cells = [f"{statistics.median(v):.0f} [{min(v):.0f}-{max(v):.0f}]" for v in (fp32, bf16)]
            spread = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
            print(f"| {scheme} | {n} | {cells[0]} | {cells[1]} | {spread} |", flush=True)
        if not args.deepseek:  # random weights: nothing to score
            accuracy.append((scheme, *perplexities(path, args.context, args.max_tokens)))
    if accuracy:
        print_accuracy(accuracy, args.context)
    print(f"\nmedians [min-max] over {args.rounds} rounds")


def print_accuracy(accuracy: list[tuple], context: int) -> None:
    """The perplexity table: per scheme, each setting's, the change's interval and top-1 agreement."""
    print("\n| scheme | perplexity, fp32 attention | bf16 attention | change [95% interval] | top-1 agreement |")
    print("|---|---:|---:|---:|---:|")
    for scheme, (fp32, bf16), (low, high), agree in accuracy:
        change = f"{(bf16 / fp32 - 1) * 100:+.2f}% [{low * 100:+.2f}, {high * 100:+.2f}]"
        print(f"| {scheme} | {fp32:.3f} | {bf16:.3f} | {change} | {agree * 100:.2f}% |")
    print(f"intervals paired by {context}-token window")


if __name__ == "__main__":
    main()
