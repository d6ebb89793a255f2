"""`slimquant eval`: perplexity of float and quantized models side by side, on the same token windows."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the eval sub-command."""
    p = sub.add_parser(
        "eval",
        help="perplexity of models side by side (float first)",
        description="Perplexity of each MODEL on exactly the same token windows of a text, with the relative "
        "change and next-token (top-1) agreement against the first model.\n\n"
        "example: slimquant eval out/float out/w8a8 --corpus book.txt --context 512",
    )
    p.add_argument("models", nargs="+", help="model folders; the first is the baseline (usually float)")
    p.add_argument("--corpus", help="UTF-8 text file (default: the built-in excerpt of Persuasion)")
    p.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, help="window step (default: --context, non-overlapping)")
    p.add_argument("--max-tokens", type=int, help="use only the first N tokens of the corpus")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folders' own code")
    p.add_argument(
        "--sensitivity", action="store_true",
        help="also score each model with every norm weight moved by ~1e-6 (twice the time): a change below it is noise",
    )  # fmt: skip
    p.add_argument(
        "--perturbation", type=float, default=1e-6, metavar="REL",
        help="--sensitivity's relative change of the norm weights (default 1e-6; int8 models move about as much "
        "at 1e-8 as at 1e-3: the roundings that flip, not the size of the change, move them)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print."""
    from slimquant import zoo
    from slimquant.evaluation import evaluate

    corpus = Path(args.corpus) if args.corpus else zoo.EVAL_TEXT
    if not corpus.is_file():
        raise ValueError(f"corpus file not found: {corpus}")
    models = [str(zoo.resolve_model(m)) for m in args.models]
    text = corpus.read_text(encoding="utf-8")
    results = evaluate(
        models,
        text,
        args.context,
        args.stride,
        args.max_tokens,
        args.dtype,
        sensitivity=args.sensitivity,
        trust_remote_code=args.trust_remote_code,
        perturbation=args.perturbation,
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    print(table(results, args.perturbation))
    return 0


def table(results: list, perturbation: float = 1e-6) -> str:
    """Perplexity, change against the first model with its 95% interval, agreement and (if measured) sensitivity."""
    base, sens = results[0].perplexity, results[0].sensitivity is not None
    lines = [f"{'model':<40}{'tokens':>8}{'perplexity':>12}{'change [95% interval]':>26}{'top-1 agree':>13}"
             + (f"{'sensitivity':>13}" if sens else "")]  # fmt: skip
    for r in results:
        change = "" if r is results[0] else f"{(r.perplexity / base - 1) * 100:+.2f}%"
        if r.change_interval is not None:
            change += f" [{r.change_interval[0] * 100:+.2f}, {r.change_interval[1] * 100:+.2f}]"
        agree = "" if r.top1_agreement is None else f"{r.top1_agreement * 100:.2f}%"
        line = f"{r.model[-40:]:<40}{r.tokens:>8}{r.perplexity:>12.4f}{change:>26}{agree:>13}"
        lines.append(line + (f"{r.sensitivity * 100:>12.3f}%" if sens else ""))
    n = results[0].windows
    lines.append(f"{n} windows; the interval is paired by window (Student's t)" if n > 1 else "one window: no interval")
    if sens:
        moved = f"when every norm weight moves by {perturbation:g}"
        lines.append(f"sensitivity: mean |per-window perplexity change| {moved}")
    return "\n".join(lines)
