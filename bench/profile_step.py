"""Where slimquant's time goes in the speed table's cases: for decode of one stream and a prefill, the wall time,
cProfile's top host functions (a host function that waits on the GPU shows its wait), and torch.profiler's top
ops by device time.

    python bench/profile_step.py MODEL_DIR [--device cuda] [--prompt-len 512] [--decode-tokens 64] [--top 15]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimquant import LLM, SamplingParams  # noqa: E402
from slimquant.devices import check_device  # noqa: E402


def _host_profile(run, top: int) -> str:
    """cProfile of one run: the top functions by own time."""
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return "\n".join(line for line in out.getvalue().splitlines() if line.strip())


def _op_profile(run, device: str, top: int) -> str:
    """torch.profiler of one run: the top ops by device time (CPU time on CPU)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        run()
    key = "cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args()
    check_device(args.device)
    llm = LLM(
        model=args.model,
        max_model_len=args.prompt_len + args.decode_tokens + 16,
        max_num_batched_tokens=max(args.prompt_len, 512),
        enable_prefix_caching=False,
        device=args.device,
        enforce_eager=args.enforce_eager,
    )
    prompt = list(range(100, 100 + args.prompt_len))
    cases = {
        f"decode 1 x {args.decode_tokens}": ([[1, 2, 3]], args.decode_tokens),
        f"prefill {args.prompt_len}": ([prompt], 1),
    }
    for name, (prompts, new) in cases.items():
        params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)

        def run(prompts=prompts, params=params) -> None:
            llm.generate(prompts, params, use_tqdm=False)

        run(), run()  # warm-up: kernels compiled, graphs captured
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if args.device == "cuda":
            torch.cuda.synchronize()
        print(f"\n## {name}: {1e3 * (time.perf_counter() - start):.2f} ms wall\n", flush=True)
        print(_host_profile(run, args.top), flush=True)
        print(_op_profile(run, args.device, args.top), flush=True)


if __name__ == "__main__":
    main()
