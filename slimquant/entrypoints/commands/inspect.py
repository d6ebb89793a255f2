"""`slimquant inspect`: what an ascend checkpoint is, and whether slimquant and vLLM-Ascend load it (and why not)."""

from __future__ import annotations

import argparse
import json

LOADERS = {"slimquant": "slimquant", "vllm-ascend": "vLLM-Ascend"}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the inspect sub-command."""
    p = sub.add_parser(
        "inspect",
        help="check an ascend checkpoint against slimquant's and vLLM-Ascend's loaders",
        description="Print an ascend (ModelSlim) checkpoint's layout (ModelSlim V0 / V1), model, schemes per layer "
        "and sizes, then every rule of slimquant's and vLLM-Ascend's loaders that it breaks, each with the fix. "
        "Exit status 1 when a loader would refuse it or run it wrong (--loader picks which count).\n\n"
        "example: slimquant inspect out/smollm2-w8a8",
    )
    p.add_argument("model", help="checkpoint folder (quant_model_description.json, shards, config.json)")
    p.add_argument(
        "--loader",
        choices=["both", *LOADERS],
        default="both",
        help="whose verdict sets the exit status (default both)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Inspect, print, and exit 1 when the chosen loaders would not run it."""
    from slimquant.models.compat import inspect_checkpoint

    report = inspect_checkpoint(args.model)
    print(json.dumps(report.to_dict(), indent=2) if args.json else render(report))
    chosen = list(LOADERS) if args.loader == "both" else [args.loader]
    return 0 if all(report.loads(loader) for loader in chosen) else 1


def render(report) -> str:
    """The report as text: facts, then one verdict per loader with its findings."""
    total = sum(report.bytes_by_scheme.values())
    sizes = ", ".join(f"{k} {_mb(v)}" for k, v in sorted(report.bytes_by_scheme.items(), key=lambda kv: -kv[1]))
    layout = report.layout + (" (the older saver's; slimquant writes it)" if report.layout.endswith("V0") else "")
    lines = [
        f"checkpoint  {report.path}",
        f"layout      {layout}",
        f"model       {report.model_type}, {report.num_layers} layers, {report.dtype}"
        + (", tied embeddings" if report.tied_embeddings else ""),
        f"quant       {report.model_quant_type}, KV cache {report.kv_cache}",
        f"size        {_mb(total)} in {report.shards} shard{'s' if report.shards != 1 else ''}: {sizes}",
        "linears     " + ", ".join(f"{k} {v}" for k, v in report.linears_by_scheme.items()),
    ]
    for g in report.layers:
        span = (f"{g.first}" if g.first == g.last else f"{g.first}-{g.last}") + (" MTP" if g.mtp else "")
        lines.append(f"layers {span:<5} " + " · ".join(f"{k}: {' '.join(v)}" for k, v in g.schemes.items()))
    for loader, name in LOADERS.items():
        found = [f for f in report.findings if f.loader == loader]
        errors = sum(f.level == "error" for f in found)
        counts = [_count(errors, "error"), _count(len(found) - errors, "warning")]
        verdict = "fails (refuses it or runs it wrong)" if errors else "loads it"
        lines += ["", f"{name}: {verdict}" + "".join(f", {c}" for c in counts if c)]
        for f in found:
            lines += [f"  {f.level:<8}{f.rule}: {f.message}", f"  {'':<8}fix: {f.fix}"]
    return "\n".join(lines)


def _count(n: int, what: str) -> str:
    return "" if not n else f"{n} {what}{'s' if n > 1 else ''}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
