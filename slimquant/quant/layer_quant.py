"""One decoder layer: capture inputs -> smooth -> quantize -> write -> run the quantized layer for the next."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn

from slimquant.format.architectures import ArchSpec, layer_prefix
from slimquant.format.checkpoint import C8, ModelSlimWriter
from slimquant.format.primitives import kv_cache_scale
from slimquant.format.schemes import FLOAT, W8A8, quantizes_input
from slimquant.quant.activations import Activations, Spill
from slimquant.quant.decoder import BiasedNorm, LayerRunner, replace_module
from slimquant.quant.expert_stream import EXPERT_GROUP_BYTES, StreamedExperts, streamed_experts
from slimquant.quant.moe import count_idle, is_routed_expert
from slimquant.quant.observers import ChannelRange, KvRange, SecondMoment, TokenSample, observe_inputs
from slimquant.quant.qlinear import SimLinear, Tensors, linear_tensors
from slimquant.quant.smooth import Smoothing, smooth_linear, smooth_norm, smooth_producer_linear
from slimquant.quant.steps.alpha import FixedAlpha
from slimquant.quant.steps.rounding import NearestRounding
from slimquant.quant.steps.smoothing import Smoother

NormParams = dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # norm -> (weight, bias or None), fp32
Entry = tuple[str, torch.Tensor, str]  # a tensor to write: full name, tensor, description type


@dataclass
class LayerJob:
    """What every layer shares: the plan and the run's steps (quant/steps), and what they record."""

    spec: ArchSpec
    plan: dict[str, str]  # full linear name -> W8A8 | W8A8_DYNAMIC | W8A16 | FLOAT
    smoother: Smoother
    alpha: FixedAlpha
    rounder: NearestRounding
    dtype: torch.dtype
    batch_size: int
    config: dict = field(default_factory=dict)  # config.json (which linears each layer has)
    idle_experts: int = 0  # routed experts that received no calibration token, over all layers so far
    alphas: dict[str, float] = field(default_factory=dict)  # full producer name -> the alpha each group got
    kv_cache_int8: bool = False  # also calibrate and write int8 (C8) KV-cache scales
    expert_group_bytes: int = EXPERT_GROUP_BYTES  # float routed-expert weights held at once (expert_stream.py)
    spill: Spill = field(default_factory=Spill)  # the in-memory budget of calibration activations (activations.py)


@torch.no_grad()
def quantize_layer(
    i: int,
    state: dict[str, torch.Tensor],
    runner: LayerRunner,
    job: LayerJob,
    hidden: Activations,
    writer: ModelSlimWriter,
    fetch: Callable[[str], torch.Tensor],
) -> Activations:
    """Quantize and write layer i (state: its float tensors but the routed experts', relative names, consumed;
    fetch(name): a routed expert's tensor by its name relative to the layer); returns its output, batches
    [B, T, H] as hidden's."""
    layer = runner.build(i, state)
    state.clear()  # the layer holds its own (compute-dtype) copies
    prefix = layer_prefix(i)
    types = {rel: job.plan[prefix + rel] for rel in job.spec.layer_linears(job.config, i)}
    experts = streamed_experts(layer, hidden.like)
    run = lambda: runner.run(layer, hidden, keep=False)  # noqa: E731  observing only
    if experts is None:
        tensors, norms = _calibrate(layer, types, job, prefix, run)
        _write(writer, _entries(prefix, layer, tensors, norms, job.dtype))
        _patch(layer, tensors, norms, types, job.dtype, runner.dtype)
    else:
        _quantize_moe_layer(layer, experts, types, job, prefix, run, writer, runner, fetch)
    kv = KvRange() if job.kv_cache_int8 else None  # k / v as the quantized layer computes them
    out = runner.run(layer, hidden, cache=kv)
    if experts is not None:
        experts.end_replay()
    if kv is not None:
        _write_kv_cache_scales(writer, prefix, kv)
    return out


def _calibrate(layer: nn.Module, types: dict[str, str], job: LayerJob, prefix: str, run: Callable[[], object]):
    """Observe the linears' inputs during run(), smooth, and quantize them: (tensors per linear, smoothed norms)."""
    kept = job.alpha.sample_tokens  # calibration tokens per group that the alpha step scores on (0: none)
    samples = {group[0]: TokenSample(kept) for _, group in _pairs(types, job)} if kept else {}
    input_of = _hessian_inputs(types, job) if job.rounder.needs_hessian else {}  # linear -> where its input is read
    moments = {key: SecondMoment() for key in set(input_of.values())}
    extra = {n: [r for r in (samples.get(n), moments.get(n)) if r is not None] for n in types}
    with observe_inputs(layer, list(types), extra) as ranges:
        run()
    job.idle_experts += count_idle(ranges, tuple(types))
    smoothings = _smoothings(layer, ranges, types, job, samples, prefix)
    norms = {
        src: smooth_norm(layer.get_submodule(src).weight, sm) for src, (sm, _) in smoothings.items() if src not in types
    }
    by_linear = {rel: sm for sm, group in smoothings.values() for rel in group}  # column smoothing
    by_rows = {src: sm for src, (sm, _) in smoothings.items() if src in types}  # row smoothing (producer)
    in_ranges = _input_ranges(ranges, by_linear, job.spec.layer_fused(tuple(types)))
    hessians = _hessians(input_of, moments, by_linear)
    tensors = {
        rel: _quantize_linear(
            layer,
            rel,
            by_linear.get(rel),
            by_rows.get(rel),
            types[rel],
            in_ranges.get(rel),
            job.dtype,
            job.rounder,
            hessians.get(rel),
        )
        for rel in types
    }
    return tensors, norms


def _quantize_moe_layer(layer, experts: StreamedExperts, types, job, prefix, run, writer, runner, fetch) -> None:
    """The MoE layer quantized and written with one group of routed experts in memory at a time
    (quant/expert_stream.py); leaves it patched, its experts replaying their summed outputs for the last run."""
    rest = {rel: t for rel, t in types.items() if not is_routed_expert(rel)}
    tensors, norms = _calibrate(layer, rest, job, prefix, run)  # the float layer; experts record their inputs
    float_batches = experts.take_recorded()
    before, after = _around_experts(layer)
    _write(writer, _entries(prefix, layer, tensors, norms, job.dtype, before))
    after_experts = _entries(prefix, layer, tensors, norms, job.dtype, after)  # of the float layer, written later
    _patch(layer, tensors, norms, rest, job.dtype, runner.dtype)
    run()  # the quantized layer; experts record their inputs again
    quant_batches = experts.take_recorded()
    outputs = quant_batches.map(lambda b, batch: torch.zeros_like(batch[0]))  # [T, H]: the routed experts' sum
    names = list(experts.template.state_dict())
    per_expert = sum(p.numel() for p in experts.template.parameters()) * runner.dtype.itemsize
    for group in experts.groups(per_expert, job.expert_group_bytes):
        for e in group:
            experts.load(e, runner.to_compute({n: fetch(f"mlp.experts.{e}.{n}") for n in names}))
        group_types = {rel: t for rel, t in types.items() if _expert_of(rel) in group}
        assert not _pairs(group_types, job), "routed experts share no smoothing pair with the rest of the layer"
        group_tensors, _ = _calibrate(layer, group_types, job, prefix, lambda g=group: experts.run(g, float_batches))
        in_group = lambda name, g=group: _expert_of(name) in g  # noqa: E731
        _write(writer, _entries(prefix, layer, group_tensors, {}, job.dtype, in_group))
        _patch(layer, group_tensors, {}, group_types, job.dtype, runner.dtype)
        experts.run(group, quant_batches, outputs)
        experts.release(group)
    _write(writer, after_experts)
    float_batches.release()
    quant_batches.release()
    experts.replay = outputs


def _expert_of(name: str) -> int | None:
    """E of a name under mlp.experts.E (relative to the layer), else None."""
    if not is_routed_expert(name):
        return None
    return int(name.split(".")[2])


def _around_experts(layer: nn.Module) -> tuple[Callable[[str], bool], Callable[[str], bool]]:
    """Tests for the module names that come before the routed experts in named_modules() order, and after them."""
    order = [n for n, _ in layer.named_modules()]
    first = order.index("mlp.experts")
    before = set(order[:first])
    after = {n for n in order[first + 1 :] if not is_routed_expert(n)}
    return before.__contains__, after.__contains__


def _write_kv_cache_scales(writer: ModelSlimWriter, prefix: str, kv: KvRange) -> None:
    """Symmetric per-channel C8 scales [KVH * D] (fp32) and zero offsets (int32), as ModelSlim's V1 saver writes."""
    for proj, amax in (("k_proj", kv.k_amax), ("v_proj", kv.v_amax)):
        assert amax is not None, "the layer's attention never handed its k / v to the observer"
        scale = kv_cache_scale(amax).reshape(-1)  # [KVH * D]
        writer.add(f"{prefix}self_attn.{proj}.kv_cache_scale", scale, C8)
        writer.add(f"{prefix}self_attn.{proj}.kv_cache_offset", torch.zeros_like(scale, dtype=torch.int32), C8)


def _pairs(types: dict[str, str], job: LayerJob) -> list[tuple[str, tuple[str, ...]]]:
    """The smoothing pairs (producer, linears) with at least one linear that quantizes its input; none without
    smoothing."""
    if not job.smoother.active:
        return []
    pairs = job.spec.layer_smooth_pairs(tuple(types))
    return [(src, group) for src, group in pairs if quantizes_input(types[rel] for rel in group)]


def _smoothings(
    layer: nn.Module, ranges: dict[str, ChannelRange], types: dict[str, str], job: LayerJob, samples, prefix
):
    """producer -> (Smoothing, its linears) for every pair with at least one quantized linear."""
    out = {}
    for src, group in _pairs(types, job):
        lins = [layer.get_submodule(rel) for rel in group]
        smoother = job.smoother.for_linear_producer() if src in types else job.smoother  # a linear takes no shift
        members = [(lin.weight, lin.bias, types[rel]) for rel, lin in zip(group, lins, strict=True)]
        sample = samples[group[0]].tensor() if group[0] in samples else None
        alpha = job.alpha.choose(sample, ranges[group[0]], members, smoother, job.dtype)
        job.alphas[prefix + src] = alpha
        out[src] = (smoother.factors(ranges[group[0]], [lin.weight for lin in lins], alpha), group)
    return out


def _hessian_inputs(types: dict[str, str], job: LayerJob) -> dict[str, str]:
    """Each quantized linear the rounder rounds with a Hessian -> the linear whose input it shares (the first of its
    smoothing group)."""
    first = {rel: group[0] for _, group in job.spec.layer_smooth_pairs(tuple(types)) for rel in group}
    return {
        rel: first.get(rel, rel)
        for rel, t in types.items()
        if t != FLOAT and not any(fnmatchcase(rel, g) for g in job.rounder.skip)
    }


def _hessians(input_of: dict[str, str], moments: dict[str, SecondMoment], by_linear: dict[str, Smoothing]):
    """linear -> H [K, K] of its smoothed input (one per shared input); linears whose input saw no token: none."""
    cache: dict[str, torch.Tensor] = {}
    out = {}
    for rel, key in input_of.items():
        if moments[key].count == 0:  # never ran: round to nearest
            continue
        if key not in cache:
            sm = by_linear.get(rel)
            cache[key] = moments[key].hessian(None, None) if sm is None else moments[key].hessian(sm.shift, sm.scale)
        out[rel] = cache[key]
    return out


def _input_ranges(ranges, by_linear: dict[str, Smoothing], fused) -> dict[str, tuple[float, float]]:
    """Per-tensor input (min, max) of each linear after smoothing (none if it saw no token); fused: their union."""
    out = {}
    for rel, rng in ranges.items():
        if rng.min is None:  # a routed expert the router never chose
            continue
        sm = by_linear.get(rel)
        if sm is not None:
            rng = rng.transformed(sm.shift if sm.shift is not None else 0.0, sm.scale)
        out[rel] = rng.tensor_range()
    for group in fused:
        seen = [out[r] for r in group if r in out]
        if seen:
            lo, hi = min(r[0] for r in seen), max(r[1] for r in seen)
            out |= {r: (lo, hi) for r in group}
    return out


def _quantize_linear(
    layer, rel, sm, sm_rows, qtype, in_range, dtype, rounder: NearestRounding, hessian=None
) -> Tensors:
    if qtype == W8A8 and in_range is None:
        raise ValueError(
            f"{rel} received no calibration token, so static W8A8 has no input range for it; "
            "use more --num-samples or make it w8a8_dynamic (e.g. --mix '*.mlp.experts.*=w8a8_dynamic')"
        )
    lin = layer.get_submodule(rel)
    w, b = lin.weight.float(), None if lin.bias is None else lin.bias.float()  # [N, K], [N]
    if sm is not None:
        w, b = smooth_linear(w, b, sm)
    if sm_rows is not None:
        w, b = smooth_producer_linear(w, b, sm_rows)
    quantized = rounder.round(w, hessian) if qtype != FLOAT else None
    return linear_tensors(w, b, qtype, in_range, dtype, quantized)


def _write(writer: ModelSlimWriter, entries: list[Entry]) -> None:
    for name, tensor, qtype in entries:
        writer.add(name, tensor, qtype)


def _entries(
    prefix: str, layer: nn.Module, tensors, norms: NormParams, dtype, part: Callable[[str], bool] = lambda name: True
) -> list[Entry]:
    """What to write for the modules part() selects of the float layer, in named_modules() order: each quantized
    linear's tensors, the other parameters and persistent buffers, norms after smoothing."""
    out = []
    for name, mod in layer.named_modules():
        if not part(name):
            continue
        if name in tensors:
            out += [(f"{prefix}{name}.{suffix}", t, qtype) for suffix, (t, qtype) in tensors[name].items()]
            continue
        for pname, p in mod.named_parameters(recurse=False):
            value = norms[name][0] if name in norms and pname == "weight" else p
            out.append((f"{prefix}{name}.{pname}", value.to(dtype), FLOAT))
        for bname, buf in mod.named_buffers(recurse=False):  # e.g. the router's e_score_correction_bias: fp32
            if bname not in mod._non_persistent_buffers_set:
                out.append((f"{prefix}{name}.{bname}", buf.float(), FLOAT))
        if name in norms and norms[name][1] is not None:
            out.append((f"{prefix}{name}.bias", norms[name][1].to(dtype), FLOAT))
    return out


def _patch(layer: nn.Module, tensors, norms: NormParams, types: dict[str, str], dtype, compute_dtype) -> None:
    """Turn the float layer into what the runtime will compute: SimLinears, smoothed norms (+bias) as written."""
    for rel, t in tensors.items():
        replace_module(layer, rel, SimLinear(types[rel], t, dtype))
    for name, (w, b) in norms.items():
        norm = layer.get_submodule(name)
        norm.weight = nn.Parameter(w.to(dtype).to(compute_dtype), requires_grad=False)
        if b is not None:
            replace_module(layer, name, BiasedNorm(norm, b.to(dtype).to(compute_dtype)))
