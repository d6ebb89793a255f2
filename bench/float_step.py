"""A bf16 float model's decode: the native step (fp32 arithmetic over the bf16 weights) against the per-op path
(bf16 GEMMs), at T concurrent streams, in one process: the measurements behind backends/cpu_native.py's
BF16_STEP_MAX_MACS (the per-op path's bf16 GEMMs win once a step's multiply-adds grow large).

    .venv/bin/python bench/float_step.py [--model SmolLM2-135M-Instruct] [--streams 1 8 16 32 64] [--tokens 8]
    .venv/bin/python bench/float_step.py --large --streams 1 2 4 8   # Qwen2.5-1.5B's shape, random weights
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speed import QWEN25_15B_SHAPE, random_checkpoint  # noqa: E402
from slimquant import LLM, SamplingParams, zoo  # noqa: E402
from slimquant.backends import cpu_native  # noqa: E402


def rate(llm: LLM, streams: int, tokens: int) -> float:
    """tokens/s of the decode steps of `streams` greedy requests (their prefill steps untimed)."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    for i in range(streams):
        engine.add_request(f"r{i}", {"prompt_token_ids": [1, 2, 3 + i]}, params)
    while len(outs := engine.step()) < streams or not all(o.outputs[0].token_ids for o in outs):
        pass
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return streams * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct", help="a bf16 float model folder or the built-in name")
    ap.add_argument("--large", action="store_true", help="a random model of Qwen2.5-1.5B's shape instead")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()
    path = random_checkpoint("qwen2", "qwen2.5-1.5b", QWEN25_15B_SHAPE) if args.large else zoo.resolve_model(args.model)
    llm = LLM(str(path), max_model_len=256, max_num_seqs=max(args.streams), enable_prefix_caching=False)
    rate(llm, 1, 2)  # warm-up: builds the native plans and the greedy head's screen
    backend = llm.llm_engine.runner.backend
    if backend.stack is None:
        raise SystemExit(f"no native step for this model: {backend.describe()}")
    macs = backend.stack.macs_per_token
    print(f"{path.name}: {macs / 1e9:.3f} G multiply-adds per token in the linears; greedy, {args.tokens} tokens")
    print("| streams | G multiply-adds per step | native step (tokens/s) | per op (tokens/s) | native / per op |")
    print("|---:|---:|---:|---:|---:|")
    for streams in args.streams:
        speeds = {}
        for name, limit in (("native", float("inf")), ("per op", 0)):
            cpu_native.BF16_STEP_MAX_MACS = limit  # inf: every step native; 0: every step per op
            speeds[name] = max(rate(llm, streams, args.tokens) for _ in range(2))
        native, per_op = speeds["native"], speeds["per op"]
        print(f"| {streams} | {streams * macs / 1e9:.1f} | {native:.1f} | {per_op:.1f} | {native / per_op:.2f}x |")


if __name__ == "__main__":
    main()
