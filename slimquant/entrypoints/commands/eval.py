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
    p.add_argument("--corpus", help="UTF-8 text file (default: the built-in Pride and Prejudice excerpt)")
    p.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, help="window step (default: --context, non-overlapping)")
    p.add_argument("--max-tokens", type=int, help="use only the first N tokens of the corpus")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
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
    results = evaluate(
        models, corpus.read_text(encoding="utf-8"), args.context, args.stride, args.max_tokens, args.dtype
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    base = results[0].perplexity
    print(f"{'model':<48}{'tokens':>8}{'perplexity':>12}{'change':>9}{'top-1 agree':>13}")
    for r in results:
        agree = "" if r.top1_agreement is None else f"{r.top1_agreement * 100:.2f}%"
        print(
            f"{r.model[-48:]:<48}{r.tokens:>8}{r.perplexity:>12.4f}{(r.perplexity / base - 1) * 100:>+8.2f}%{agree:>13}"
        )
    return 0
