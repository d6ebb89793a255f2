"""`slimquant demo`: quantize the default model to W8A8_DYNAMIC and W8A8, generate, chat, compare."""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from slimquant.quant.output import folder_bytes

PROMPTS = ["Hello, my name is", "The future of AI is"]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
SPEED_TOKENS = 64


def register(sub: argparse._SubParsersAction) -> None:
    """Add the demo sub-command."""
    p = sub.add_parser(
        "demo",
        help="quantize SmolLM2-135M-Instruct to int8 and generate (the Quick start)",
        description="Convert the built-in SmolLM2-135M-Instruct once, quantize it to W8A8_DYNAMIC and W8A8 "
        "(cached in $SLIMQUANT_CACHE, default ~/.cache/slimquant), generate from two prompts and one chat "
        "turn, then print size, speed and perplexity of float vs int8.\n\nexample: slimquant demo",
    )
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens of the built-in text for perplexity")
    p.add_argument("--refresh", action="store_true", help="re-quantize even if cached")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the whole demo and print its table."""
    from slimquant import zoo

    float_dir = zoo.default_model_dir()
    models = {"float (bf16)": float_dir}
    for qtype in ("w8a8_dynamic", "w8a8"):
        models[qtype.upper()] = _quantized(float_dir, zoo.cache_dir() / f"{zoo.DEFAULT_MODEL}-{qtype}", qtype, args)
    speeds = {name: _generate(name, path, chat=name == "W8A8_DYNAMIC") for name, path in models.items()}
    ppl = _perplexity(list(models.values()), args.eval_tokens)
    _print_table(models, speeds, ppl)
    return 0


def _quantized(src: Path, dst: Path, qtype: str, args: argparse.Namespace) -> Path:
    """Quantize src to dst unless a finished copy is cached."""
    from slimquant import quantize

    if args.refresh or not (dst / "quant_model_description.json").is_file():
        print(f"\n== quantizing to {qtype.upper()} -> {dst}")
        quantize(str(src), str(dst), quant_type=qtype, overwrite=True)
    return dst


def _generate(name: str, path: Path, chat: bool) -> float:
    """Print the two prompts' samples (and a chat turn); return decode speed in tokens/s."""
    from slimquant import LLM, SamplingParams

    print(f"\n== {name}: {path}")
    llm = LLM(model=str(path), max_model_len=2048, max_num_seqs=8)
    for o in llm.generate(
        PROMPTS, SamplingParams(temperature=0.6, top_p=0.95, top_k=40, max_tokens=48), use_tqdm=False
    ):
        print(f"{o.prompt!r} -> {o.outputs[0].text!r}")
    if chat:
        reply = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)[0].outputs[0].text
        print(f"chat: {CHAT[0]['content']!r} -> {reply!r}")
    speed_params = SamplingParams(temperature=0, max_tokens=SPEED_TOKENS, ignore_eos=True)
    llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    llm.generate(PROMPTS[:1], speed_params, use_tqdm=False)
    speed = SPEED_TOKENS / (time.perf_counter() - start)
    del llm
    gc.collect()
    return speed


def _perplexity(paths: list[Path], max_tokens: int) -> list:
    from slimquant.evaluation import evaluate
    from slimquant.zoo import EVAL_TEXT

    print(f"\n== perplexity on the first {max_tokens} tokens of {EVAL_TEXT.name} (every model computed in fp32)")
    text = EVAL_TEXT.read_text()
    return evaluate([str(p) for p in paths], text, context=512, max_tokens=max_tokens, dtype="float32")


def _print_table(models: dict[str, Path], speeds: dict[str, float], results: list) -> None:
    base_size, base_speed, base_ppl = (
        folder_bytes(next(iter(models.values())), "*.safetensors"),
        speeds["float (bf16)"],
        results[0].perplexity,
    )
    print(f"\n{'model':<14}{'size MB':>9}{'x':>7}{'decode tok/s':>14}{'x':>7}{'perplexity':>12}"
          f"{'change [95% interval]':>26}")  # fmt: skip
    for (name, path), r in zip(models.items(), results, strict=True):
        size, speed = folder_bytes(path, "*.safetensors"), speeds[name]
        change = f"{(r.perplexity / base_ppl - 1) * 100:+.2f}%"
        if r.change_interval is not None:
            change += f" [{r.change_interval[0] * 100:+.2f}, {r.change_interval[1] * 100:+.2f}]"
        print(
            f"{name:<14}{size / 1e6:>9.1f}{size / base_size:>7.2f}{speed:>14.1f}{speed / base_speed:>7.2f}"
            f"{r.perplexity:>12.3f}{change:>26}"
        )
    print(f"(the interval: paired over the {results[0].windows} windows of 512 tokens)")
