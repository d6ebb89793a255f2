"""Accuracy of each quantization method on SmolLM2-135M-Instruct against float, all measured in one run.

Every method in METHODS is quantized (into --work, reused with --reuse), then every model is scored by one
slimquant.evaluation.evaluate() call: --text (default: Persuasion, slimquant.zoo.EVAL_TEXT, which no method was
tuned on: volume one, chapters 1-12, about 53,000 tokens; "dev": Pride and Prejudice, zoo.DEV_TEXT, the text
methods were developed on), all of it or the first --max-tokens tokens, in --context-token windows, every model
computed in fp32: float (the bf16 source upcast) first, as the baseline, whatever the CPU's native dtype (a bf16
baseline would shift every row's change). Prints a
markdown table (method, type, perplexity, change vs float with its 95% interval paired by window, the change
against its type's default with its paired interval and whether it is significant, top-1 agreement with float,
float linears, size; with --sensitivity also each model's mean |per-window perplexity change| when every norm
weight moves by 1e-6) and whether issue 23's goals are met by the default settings: W8A8_DYNAMIC within +0.5%,
W8A8 within +1.5% (by the interval's upper end, or by the point estimate only), intervals narrower than +-0.3
points, sensitivity below 0.2%.
"w8a8-default" is quantize()'s default for --type w8a8 (Llama/Qwen: rotated, mlp.down_proj W8A8_DYNAMIC, the rest
static);
"w8a8-static-all" and the w8a8-* rows after it quantize every linear static (static_all=True).

    .venv/bin/python bench/accuracy.py                                  # all methods, all of the text
    .venv/bin/python bench/accuracy.py --methods float,dyn-default,w8a8-default --max-tokens 4096

A method whose settings quantize() does not accept (yet) prints "n/a". Add a method: one line in METHODS.
With --reuse, a folder quantized by older code keeps its label: delete --work after changing the quantizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

TARGETS = {"dyn-default": 0.5, "w8a8-default": 1.5}  # method -> max perplexity increase, %
MAX_HALF_WIDTH, MAX_SENSITIVITY = 0.3, 0.2  # points, %
DEFAULTS = {"dyn": "dyn-default", "w8a8": "w8a8-default"}  # a label's prefix -> the row it is compared with


@dataclass
class Method:
    """One row: a label and the keyword arguments of slimquant.quantize() (none: the float source itself)."""

    label: str
    kwargs: dict | None = field(default_factory=dict)


DYN, STATIC = {"quant_type": "w8a8_dynamic"}, {"quant_type": "w8a8"}
PURE = STATIC | {"static_all": True}  # every quantized linear static (the default w8a8 makes down_proj dynamic)
METHODS = [  # "-default": quantize()'s own defaults for the type (the note column says which smoothing ran)
    Method("float", None),
    Method("dyn-default", DYN),  # SmoothQuant alpha 0.5
    Method("dyn-none", DYN | {"anti_outlier": "none"}),
    Method("dyn-iterative0.5", DYN | {"anti_outlier": "iterative", "alpha": 0.5}),
    Method("dyn-auto", DYN | {"anti_outlier": "smoothquant", "alpha": "auto"}),
    Method("dyn-gptq", DYN | {"rounding": "gptq"}),
    Method("dyn-maxloss0.5", DYN | {"max_loss": 0.5}),
    Method("dyn-rotate", DYN | {"rotate": True}),  # Hadamard rotation of the residual stream folded in first
    Method("dyn-float-down", DYN | {"keep_float": ["*.mlp.down_proj"]}),  # the linear that costs most, float
    Method("dyn-down-w8a16", DYN | {"mix": ["*.mlp.down_proj=w8a16"]}),  # its weight int8, its input float
    Method("w8a8-default", STATIC),  # rotated (Llama / Qwen), SmoothQuant alpha 0.5, mlp.down_proj dynamic
    Method("w8a8-no-rotate", STATIC | {"rotate": False}),
    Method("w8a8-default-gptq", STATIC | {"rounding": "gptq"}),
    Method("w8a8-default-maxloss1", STATIC | {"max_loss": 1.0}),
    Method("w8a8-float-down", STATIC | {"keep_float": ["*.mlp.down_proj"]}),
    Method("w8a8-down-w8a16", STATIC | {"mix": ["*.mlp.down_proj=w8a16"]}),
    Method("w8a8-static-all", PURE),  # SmoothQuant alpha 0.5, every linear static
    Method("w8a8-none", PURE | {"anti_outlier": "none"}),
    Method("w8a8-iterative0.5", PURE | {"anti_outlier": "iterative", "alpha": 0.5}),
    Method("w8a8-auto", PURE | {"anti_outlier": "smoothquant", "alpha": "auto"}),
    Method("w8a8-gptq", PURE | {"rounding": "gptq"}),
    Method("w8a8-maxloss3", PURE | {"max_loss": 3.0}),
]


@dataclass
class Built:
    """A method's model folder (None: n/a) and what quantizing it reported."""

    method: Method
    path: Path | None
    note: str = ""
    seconds: float = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    from slimquant import zoo

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", help=f"comma-separated labels (default: all): {','.join(m.label for m in METHODS)}")
    p.add_argument("--max-tokens", type=int, help="tokens of the text to score [all]")
    p.add_argument("--text", default="heldout", help="heldout (Persuasion), dev (Pride and Prejudice) or a file")
    p.add_argument("--context", type=int, default=512, help="tokens per window [512]")
    p.add_argument("--model", default=None, help="float HF folder [the zoo's SmolLM2-135M-Instruct bf16]")
    p.add_argument("--work", type=Path, default=zoo.cache_dir() / "accuracy", help="where quantized models go")
    p.add_argument("--reuse", action="store_true", help="keep models already quantized in --work")
    p.add_argument("--sensitivity", action="store_true", help="also score every model with perturbed norms (2x time)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    return p.parse_args(argv)


def select(methods: str | None) -> list[Method]:
    """The METHODS named in --methods (float always first), in table order."""
    if not methods:
        return list(METHODS)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(names) - {m.label for m in METHODS})
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {[m.label for m in METHODS]}")
    return [m for m in METHODS if m.label == "float" or m.label in names]


def build(method: Method, src: Path, work: Path, reuse: bool) -> Built:
    """Quantize one method into work/label (or reuse it); n/a when quantize() rejects its settings."""
    from slimquant import quantize

    if method.kwargs is None:
        return Built(method, src)
    unknown = sorted(set(method.kwargs) - _quantize_arguments())
    if unknown:
        return Built(method, None, f"n/a: quantize() has no {', '.join(unknown)} yet")
    dst, note_file = work / method.label, work / f"{method.label}.note"
    if reuse and (dst / "quant_model_description.json").is_file():
        return Built(method, dst, note_file.read_text() if note_file.is_file() else "reused")
    start = time.perf_counter()
    try:
        summary = quantize(src, dst, overwrite=True, progress=False, **method.kwargs)
    except (TypeError, ValueError) as e:
        return Built(method, None, f"n/a: {e}")
    mix = getattr(summary, "default_mix", "")
    note = " ".join(filter(None, [f"smoothing {summary.anti_outlier}", mix and f"mix {mix}", _fallback_note(summary)]))
    note_file.write_text(note)  # shown again with --reuse
    print(f"quantized {method.label} in {time.perf_counter() - start:.0f} s {note}", file=sys.stderr, flush=True)
    return Built(method, dst, note, time.perf_counter() - start)


def _quantize_arguments() -> set[str]:
    """The keyword arguments slimquant.quantize() takes: its own and QuantizeOptions' (parsed or as they are)."""
    from slimquant import quantize
    from slimquant.quant.options import QuantizeOptions

    fields = {f.name for f in dataclasses.fields(QuantizeOptions)}
    parsed = set(inspect.signature(QuantizeOptions.parse).parameters)
    return set(inspect.signature(quantize).parameters) | parsed | fields


def _fallback_note(summary) -> str:
    """'held-out +0.8%' for a max_loss run, else ''."""
    fb = getattr(summary, "fallback", None)
    return "" if fb is None else f"held-out {fb.loss:+.2f}%{'' if fb.met else ' (not met)'}"


def describe(path: Path) -> tuple[str, int, float]:
    """(type, float decoder linears, weight MB) of a model folder."""
    from slimquant.format.checkpoint import is_modelslim_dir, read_description, tensor_types

    mb = round(sum(f.stat().st_size for f in path.glob("*.safetensors")) / 10**6, 1)
    if not is_modelslim_dir(path):
        return "float", -1, mb
    types = tensor_types(read_description(path))
    linears = {k: v for k, v in types.items() if k.startswith("model.layers.") and k.endswith("_proj.weight")}
    kinds = sorted(set(linears.values()) - {"FLOAT"})
    return "+".join(kinds) or "FLOAT", sum(v == "FLOAT" for v in linears.values()), mb


def table(built: list[Built], results: list) -> list[dict]:
    """One dict per row, n/a methods included, in METHODS order."""
    from slimquant.stats import change_interval

    scored = iter(results)
    base = results[0].perplexity
    by_label = {b.method.label: r for b, r in zip([b for b in built if b.path is not None], results, strict=True)}
    rows = []
    for b in built:
        r = next(scored) if b.path is not None else None
        default = by_label.get(DEFAULTS.get(b.method.label.split("-")[0], ""))
        vs_default = None
        if r is not None and default is not None and default is not r:
            vs_default = [100 * c for c in change_interval(_nll(default), _nll(r)) or (math.nan, math.nan)]
        qtype, floats, mb = describe(b.path) if b.path is not None else ("", -1, 0)
        rows.append(
            {
                "method": b.method.label,
                "type": qtype,
                "ppl": None if r is None else r.perplexity,
                "delta_pct": None if r is None else 100 * (r.perplexity / base - 1),
                "interval_pct": None if r is None or not r.change_interval else [100 * c for c in r.change_interval],
                "sensitivity_pct": None if r is None or r.sensitivity is None else 100 * r.sensitivity,
                "top1": None if r is None or r.top1_agreement is None else 100 * r.top1_agreement,
                "float_linears": floats,
                "mb": mb,
                "note": b.note,
                "tokens": None if r is None else r.tokens,
                "vs_default_pct": vs_default,
            }
        )
    return rows


def _nll(result) -> torch.Tensor:
    return torch.tensor(result.window_nll, dtype=torch.float64)


def _versus(interval: list[float] | None) -> str:
    """'[-0.40, +0.10] ~' for a paired interval against the default: '~' within noise, 'better' / 'worse' beyond."""
    if interval is None or math.isnan(interval[0]):
        return ""
    verdict = "better" if interval[1] < 0 else "worse" if interval[0] > 0 else "~"
    return f"[{interval[0]:+.2f}, {interval[1]:+.2f}] {verdict}"


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    out = [
        "| method | type | perplexity | vs float [95%] | vs default [95%] | sensitivity | top-1 agree | float linears "
        "| weights MB | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["ppl"] is None:
            out.append(f"| {r['method']} | n/a | | | | | | | | {r['note']} |")
            continue
        top1 = "" if r["top1"] is None else f"{r['top1']:.2f}%"
        floats = "" if r["float_linears"] < 0 else str(r["float_linears"])
        change = f"{r['delta_pct']:+.2f}%"
        if r["interval_pct"] is not None:
            change += f" [{r['interval_pct'][0]:+.2f}, {r['interval_pct'][1]:+.2f}]"
        sens = "" if r["sensitivity_pct"] is None else f"{r['sensitivity_pct']:.3f}%"
        versus = _versus(r["vs_default_pct"])
        cells = [r["method"], r["type"], f"{r['ppl']:.3f}", change, versus, sens, top1, floats, r["mb"], r["note"]]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def targets(rows: list[dict]) -> list[str]:
    """One line per target of the issue whose method was measured."""
    lines = []
    for r in rows:
        limit = TARGETS.get(r["method"])
        if limit is not None and r["ppl"] is not None:
            high = r["delta_pct"] if r["interval_pct"] is None else r["interval_pct"][1]
            ok = "met" if high <= limit else "met by the point estimate only" if r["delta_pct"] <= limit else "NOT met"
            lines.append(f"target {r['method']} ({r['type']}) within +{limit:.1f}%: {r['delta_pct']:+.2f}% -> {ok}")
            if r["interval_pct"] is not None:
                half = (r["interval_pct"][1] - r["interval_pct"][0]) / 2
                ok = "met" if half < MAX_HALF_WIDTH else "NOT met"
                lines.append(f"  interval narrower than +-{MAX_HALF_WIDTH} points: +-{half:.2f} -> {ok}")
            if r["sensitivity_pct"] is not None:
                ok = "met" if r["sensitivity_pct"] < MAX_SENSITIVITY else "NOT met"
                lines.append(f"  sensitivity below {MAX_SENSITIVITY}%: {r['sensitivity_pct']:.3f}% -> {ok}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Quantize, evaluate, print."""
    from slimquant import zoo
    from slimquant.evaluation import evaluate

    args = parse_args(argv)
    src = Path(args.model) if args.model else zoo.default_model_dir()
    args.work.mkdir(parents=True, exist_ok=True)
    built = [build(m, src, args.work, args.reuse) for m in select(args.methods)]
    models = [str(b.path) for b in built if b.path is not None]
    text = {"heldout": zoo.EVAL_TEXT, "dev": zoo.DEV_TEXT}.get(args.text, Path(args.text)).read_text(encoding="utf-8")
    start = time.perf_counter()
    results = evaluate(  # fp32 baseline
        models, text, args.context, max_tokens=args.max_tokens, dtype="float32", sensitivity=args.sensitivity
    )
    rows = table(built, results)
    seconds = time.perf_counter() - start
    print(f"\n{results[0].tokens} tokens of {args.text} scored in {args.context}-token windows ({seconds:.0f} s)")
    print(f"command: .venv/bin/python bench/accuracy.py {' '.join(sys.argv[1:])}\n")
    print(markdown(rows))
    print("\n" + "\n".join(targets(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
