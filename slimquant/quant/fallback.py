"""--max-loss P: keep the most sensitive linears float, fewest first, until held-out perplexity is within P %.

Held-out text: the caller's loss text, which calibrates no candidate (slimquant.convert: --loss-data, by default
the packaged prose of zoo.DEV_TEXT; the built-in chat prompts held out too few tokens, about 200, to predict prose).
The loss is 100 * (ppl(quantized) / ppl(float) - 1) on it, the float SRC as the baseline, both measured by the
`score` callable the caller passes (slimquant.convert binds the engine's evaluation: 512-token windows, at most
8192 tokens); this package never imports the engine. The written checkpoint's loss comes with a 95% interval paired
by window (slimquant.stats).

Search: quantize with the user's settings; if the loss exceeds P, measure each linear's sensitivity on that
checkpoint (sensitivity.py) and rank the keep-float units (a linear, or a group that must share one type: q/k/v,
gate/up, a layer's routed experts) by their most sensitive member. Then rank the roles (a unit's linears without
their layer: q/k/v, o_proj, gate/up, down_proj, ...) by the loss each gives kept float in every layer (one more
quantize run per role), most useful first, the units of a role in their sensitivity order: a linear's relative
output error does not tell what keeping it float buys (SmolLM2's v_proj ranks first by it and buys nothing).
Quantize again with the top k units float, k = 1, 2, 4, ... until within P, then bisect down towards the smallest
such k (to within k/8: every step is a full quantize run). The bound is every unit float: if even that misses P,
that checkpoint is written and the summary says that P was not met. Kept linears are FLOAT in the description
(as --keep-float makes them).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from slimquant.format.architectures import arch_spec
from slimquant.quant.options import QuantizeOptions
from slimquant.quant.output import check_destination, folder_bytes
from slimquant.quant.pipeline import run
from slimquant.quant.sensitivity import SensitivityReport, measure_sensitivity
from slimquant.quant.sources import HFCheckpoint
from slimquant.quant.summary import FallbackResult, QuantizeSummary
from slimquant.stats import change_interval

REFINE = 8  # bisection stops within k / 8 of the smallest passing k (each step is a full quantize run)
# (model folder, text) -> (perplexity, tokens scored, each window's mean NLL)
Score = Callable[[Path, str], tuple[float, int, list[float]]]


def parse_max_loss(value: object) -> float:
    """A --max-loss value: a finite percentage >= 0."""
    not_a_number = f"--max-loss must be a number (percent perplexity increase, e.g. 1.0), got {value!r}"
    if isinstance(value, bool):
        raise ValueError(not_a_number)
    try:
        p = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(not_a_number) from None
    if not math.isfinite(p) or p < 0:
        raise ValueError(f"--max-loss must be a finite percentage >= 0 (e.g. 1.0 for +1% perplexity), got {value!r}")
    return p


def search(units: int, measure: Callable[[int], float], max_loss: float, loss0: float) -> tuple[int, list]:
    """Smallest k in 0..units with measure(k) <= max_loss: doubling, then bisection to within k/8 (units if none).

    loss0 is measure(0), already known. Returns (k, [(k, loss), ...] in the order tried).
    """
    tried = [(0, loss0)]
    if loss0 <= max_loss or units == 0:
        return 0, tried
    lo, hi, k = 0, None, 1  # lo: largest k known to miss; hi: smallest k known to meet
    while hi is None and lo < units:
        k = min(k, units)
        tried.append((k, measure(k)))
        lo, hi = (lo, k) if tried[-1][1] <= max_loss else (k, None)
        k *= 2
    if hi is None:
        return units, tried
    while hi - lo > max(1, hi // REFINE):
        mid = (lo + hi) // 2
        tried.append((mid, measure(mid)))
        lo, hi = (lo, mid) if tried[-1][1] <= max_loss else (mid, hi)
    return hi, tried


def keep_units(report: SensitivityReport, config: dict) -> list[tuple[str, ...]]:
    """Keep-float units (a linear or a same-type group) with a quantized member, most sensitive first."""
    spec = arch_spec(config)
    err = {r.name: r.rel_error for r in report.rows}
    units = []
    for i in range(int(config["num_hidden_layers"])):
        prefix = f"model.layers.{i}."
        linears = spec.layer_linears(config, i)
        for group in _merge(spec.layer_fused(linears, with_same_type=True) + [(r,) for r in linears]):
            names = tuple(prefix + r for r in group)
            if any(n in err for n in names):
                units.append(names)
    return sorted(units, key=lambda u: -max(err.get(n, 0.0) for n in u))


def role_of(unit: tuple[str, ...]) -> tuple[str, ...]:
    """A unit's linears without their layer: ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj')."""
    return tuple(name.split(".", 3)[3] for name in unit)


def rank_by_role(units: list[tuple[str, ...]], role_loss: dict[tuple[str, ...], float]) -> list[tuple[str, ...]]:
    """units (in sensitivity order) reordered: the role whose float copy in every layer gave the lowest loss
    first, each role's units in their order."""
    return sorted(units, key=lambda u: role_loss[role_of(u)])  # stable: sensitivity order within a role


def _merge(groups: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Union of overlapping groups, in first-seen order."""
    out: list[list[str]] = []
    for g in groups:
        hit = [o for o in out if set(o) & set(g)]
        merged = list(dict.fromkeys([n for o in hit for n in o] + list(g)))
        out = [o for o in out if o not in hit] + [merged]
    return [tuple(o) for o in out]


def quantize_within_loss(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    opts: QuantizeOptions,
    *,
    max_loss: float,
    score: Score,
    loss_text: str,
    overwrite: bool = False,
    progress: bool = True,
) -> QuantizeSummary:
    """quantize() with the fewest most-sensitive linears kept float so that the loss on loss_text <= max_loss %;
    score(model folder, text) -> (perplexity, tokens scored, window NLLs) measures it."""
    start = time.perf_counter()
    p, src, dst = parse_max_loss(max_loss), Path(src), Path(dst)
    check_destination(dst, overwrite)
    if not loss_text.strip():
        raise ValueError("--max-loss needs a loss text to measure on; --loss-data is empty")
    work = dst.parent / f".{dst.name}.maxloss-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        hf_dir = _hf_source(src, work)
        candidates = replace(opts, report=False)  # the report: of the chosen candidate only
        runner = _Runner(hf_dir, work, candidates, progress, loss_text, score)
        result, chosen = runner.search(p)
        _move_into_place(chosen, dst)
        summary = runner.summaries[chosen]
        if opts.report:
            runner.sensitivity(dst).save(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return replace(
        summary,
        output=dst,
        source_bytes=folder_bytes(src, "*.safetensors"),
        output_bytes=folder_bytes(dst),
        seconds=time.perf_counter() - start,
        fallback=result,
        report=dst / "sensitivity.md" if opts.report else None,
    )


class _Runner:
    """Quantizes candidates into a work folder and measures their held-out loss against the float source."""

    def __init__(self, hf_dir: Path, work: Path, opts: QuantizeOptions, progress: bool, text: str, score: Score):
        self.hf_dir, self.work, self.opts, self.progress, self.score = hf_dir, work, opts, progress, score
        self.text, self.base_ppl, self.tokens = text, 0.0, 0  # held-out text; the float source's score on it
        self.base_windows: list[float] = []
        self.intervals: dict[Path, tuple[float, float] | None] = {}  # each candidate's 95% loss interval, percent
        self.summaries: dict[Path, QuantizeSummary] = {}
        self.units: list[tuple[str, ...]] = []

    def _baseline(self) -> None:
        """Score the float source on the held-out text (once; after the first quantize() checked the inputs)."""
        if not self.tokens:
            self.base_ppl, self.tokens, self.base_windows = self.score(self.hf_dir, self.text)

    def quantize(self, k: int) -> tuple[Path, float]:
        """Quantize with the top k units float; (folder, held-out loss %)."""
        return self.quantize_keeping(tuple(n for unit in self.units[:k] for n in unit), f"{k} unit(s)", f"float-{k}")

    def quantize_keeping(self, kept: tuple[str, ...], what: str, name: str = "role") -> tuple[Path, float]:
        """Quantize with the linears kept float (besides the user's --keep-float); (folder, held-out loss %)."""
        out = self.work / name
        keep = self.opts.keep_float + kept
        self.summaries[out] = run(self.hf_dir, out, replace(self.opts, keep_float=keep), overwrite=True, progress=False)
        self._baseline()
        ppl, _, windows = self.score(out, self.text)
        loss = 100 * (ppl / self.base_ppl - 1)
        interval = change_interval(torch.tensor(self.base_windows), torch.tensor(windows))
        self.intervals[out] = None if interval is None else (100 * interval[0], 100 * interval[1])
        self._say(f"max-loss: {what} float -> held-out loss {loss:+.3f}%")
        return out, loss

    def sensitivity(self, folder: Path) -> SensitivityReport:
        """Per-linear sensitivity of a candidate, on the calibration split."""
        o = self.opts
        kw = dict(num_samples=o.num_samples, seq_len=o.seq_len, batch_size=o.batch_size, device=o.device,
                  rotate=o.rotates(HFCheckpoint(self.hf_dir).config))  # fmt: skip
        return measure_sensitivity(self.hf_dir, folder, calib_data=o.calib_data, **kw)

    def search(self, p: float) -> tuple[FallbackResult, Path]:
        """Run the search; (result, folder of the chosen candidate). Candidates that cannot be chosen are deleted."""
        first, loss0 = self.quantize(0)
        folders = {0: first}  # k -> folder, only those that may still be chosen
        if loss0 > p:
            self.units = self.by_role(keep_units(self.sensitivity(first), HFCheckpoint(self.hf_dir).config))
            if self.units:
                shutil.rmtree(folders.pop(0))

        def measure(k: int) -> float:
            folder, loss = self.quantize(k)
            if loss <= p or k == len(self.units):  # the best so far, or the bound
                for larger in [j for j in folders if j > k]:
                    shutil.rmtree(folders.pop(larger))
                folders[k] = folder
            else:
                shutil.rmtree(folder)
            return loss

        k, tried = search(len(self.units), measure, p, loss0)
        loss = dict(tried)[k]
        kept = [n for unit in self.units[:k] for n in unit]
        result = FallbackResult(
            p, loss, loss <= p, kept, tried, len(self.units), self.tokens, self.intervals[folders[k]]
        )
        return result, folders[k]

    def by_role(self, units: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        """units ranked by role (rank_by_role), each role's loss measured with its units float in every layer."""
        roles = list(dict.fromkeys(role_of(u) for u in units))
        if len(roles) < 2:
            return units
        role_loss = {}
        for role in roles:
            keep = tuple(n for u in units if role_of(u) == role for n in u)
            name = "/".join(r.rpartition(".")[2] for r in role)  # q_proj/k_proj/v_proj
            folder, role_loss[role] = self.quantize_keeping(keep, f"every {name}")
            shutil.rmtree(folder)
        return rank_by_role(units, role_loss)

    def _say(self, line: str) -> None:
        if self.progress:
            print(line, file=sys.stderr, flush=True)


def _hf_source(src: Path, work: Path) -> Path:
    """src itself, or a .gguf converted into work/source."""
    if src.suffix != ".gguf":
        return src
    from slimquant.quant.gguf import gguf_to_hf

    return Path(gguf_to_hf(src, work / "source"))


def _move_into_place(folder: Path, dst: Path) -> None:
    """Rename folder to dst, replacing an existing dst."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        os.replace(dst, old)
    os.replace(folder, dst)
    shutil.rmtree(old, ignore_errors=True)
