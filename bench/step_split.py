"""Where a decode step's time goes, without a profiler's overhead: perf_counter wrappers around the engine's parts
(scheduler, inputs, the native stack, the LM head, outputs) over greedy decode steps; host = wall - stack - head.

    .venv/bin/python bench/step_split.py [--model SmolLM2-135M-Instruct] [--streams 1] [--tokens 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speed import add_model_args, int8_model  # noqa: E402
from slimquant import LLM, SamplingParams  # noqa: E402
from slimquant.backends import cpu_native, greedy_screen  # noqa: E402

TIMES: dict[str, float] = defaultdict(float)


def timed(name: str, fn):
    """fn, adding its wall time to TIMES[name]."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        TIMES[name] += time.perf_counter() - start
        return result

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    path = int8_model(args)
    engine = LLM(str(path), max_model_len=args.tokens + 64).llm_engine
    cpu_native.decoder_model = timed("stack", cpu_native.decoder_model)
    greedy_screen.GreedyHead.argmax = timed("head", greedy_screen.GreedyHead.argmax)
    for name in ("schedule", "update"):
        setattr(engine.scheduler, name, timed(name, getattr(engine.scheduler, name)))
    engine.runner.prepare = timed("inputs", engine.runner.prepare)
    engine._process = timed("outputs", engine._process)
    params = SamplingParams(temperature=0, max_tokens=args.tokens + 1, ignore_eos=True)
    print(f"{path.name}: {args.streams} stream(s), greedy, {args.tokens} decode steps; ms per step")
    for r in range(args.rounds):
        for i in range(args.streams):
            engine.add_request(f"{r}-{i}", f"Once upon a time {i}", params)
        while len(outs := engine.step()) < args.streams or not all(o.outputs[0].token_ids for o in outs):
            pass  # the prefill steps, untimed
        TIMES.clear()
        start, steps = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        wall = (time.perf_counter() - start) / steps * 1e3
        parts = {name: t / steps * 1e3 for name, t in TIMES.items()}
        host = wall - parts["stack"] - parts.get("head", 0.0)
        line = " ".join(f"{name} {ms:.3f}" for name, ms in parts.items())
        print(f"{args.streams * steps / (wall * steps / 1e3):.1f} tokens/s: wall {wall:.3f} host {host:.3f} | {line}")


if __name__ == "__main__":
    main()
