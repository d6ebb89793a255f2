"""Test helper: turn a tiny float HF folder into an ascend (ModelSlim) checkpoint with chosen quant types.

Written directly with the quant primitives (not the project's quantizer), with random but calibrated-looking
static activation parameters (non-zero input_offset), in one of three layouts:
- "slimquant": what slimquant's own writer (ModelSlimWriter) writes;
- "v0": ModelSlim's older saver (llm_ptq_tools): quant_model_weight_<type>-*.safetensors, header keys first,
  indent 2, static linears with weight_scale / weight_offset, a bf16 model's input_scale / input_offset in bf16;
- "v1": ModelSlim's current saver (modelslim_v1 ascendv1.py): quant_model_weights-*.safetensors, tensors first then
  version / model_quant_type / metadata / group_size / optional, indent 4; static linears without weight_scale /
  weight_offset (weight, quant_bias, input_scale, input_offset, deq_scale, bias), input_offset and float biases in
  fp32, lm_head written (a copy of the embeddings) for tied models.
The v0 / v1 files are written with safetensors and json directly, from those rules, not with slimquant's writer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from slimquant.format import primitives as P
from slimquant.format.checkpoint import ModelSlimWriter
from slimquant.format.safetensors_io import SafetensorsFolder
from slimquant.format.schemes import FLOAT

LAYOUTS = ("slimquant", "v0", "v1")

MLA_LINEARS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")  # DeepSeek V2/V3 attention
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", *MLA_LINEARS)
# Linears that read the same input share one input_scale/offset (fused at run time, or calibrated on one input).
INPUT_GROUP = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "q_a_proj": "qkv",
    "kv_a_proj_with_mqa": "qkv",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
}


def write_ascend(
    src: Path,
    dst: Path,
    quant_type: Callable[[str], str],
    dtype: torch.dtype = torch.float32,
    deq_int64: bool | None = None,
    shift: bool = False,
    seed: int = 0,
    layout: str = "slimquant",
    kv_cache: str | None = None,
    model_quant_type: str = "W8A8",
) -> Path:
    """Write dst from src; quant_type(linear prefix) -> "W8A8" | "W8A8_DYNAMIC" | "W8A16" | "FLOAT"; layout: one of
    LAYOUTS.

    shift=True mimics the anti-outlier shift: every layernorm gets a bias and every linear it feeds gets one, but
    routed experts (no MoE runs them with a bias: the loaders refuse it).
    kv_cache="sym" / "asym" adds int8 (C8) KV-cache scales per channel (offsets zero, or small integers) and the
    header keys, as both savers write them (scale fp32; offset int32 in V1, fp32 otherwise).
    """
    assert layout in LAYOUTS, layout
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy(f, dst / f.name)
    tensors, gen = SafetensorsFolder(src), torch.Generator().manual_seed(seed)
    entries, act_params = _Entries(), {}
    for name in tensors.keys():
        prefix, _, leaf = name.rpartition(".")
        linear = prefix.rpartition(".")[2]
        if linear not in LINEARS:
            entries.add(name, tensors.get(name).to(dtype), FLOAT)
            if shift and name.endswith("layernorm.weight"):
                entries.add(f"{prefix}.bias", _random_like(tensors.get(name), gen).to(dtype), FLOAT)
            continue
        if leaf != "weight":
            continue  # a linear's bias is written with its weight
        w, qtype = tensors.get(name), quant_type(prefix)
        bias = tensors.get(f"{prefix}.bias") if f"{prefix}.bias" in tensors else None
        if bias is None and shift and linear in INPUT_GROUP and ".mlp.experts." not in prefix:
            bias = _random_like(w[:, 0], gen)
        if qtype == FLOAT:
            out = {"weight": w.to(dtype)} | ({} if bias is None else {"bias": bias.to(dtype)})
        else:
            out = _quantized(w, bias, qtype, _activation_params(prefix, act_params, gen), dtype, deq_int64)
            out = _as_layout(out, qtype, dtype, layout)
        for key, t in out.items():
            entries.add(f"{prefix}.{key}", t, FLOAT if qtype == FLOAT or key == "bias" else qtype)
    if kv_cache:
        _add_kv_cache_scales(entries, json.loads((src / "config.json").read_text()), kv_cache, gen, layout)
    if layout == "v1" and "lm_head.weight" not in tensors:  # a tied head: V1 writes it
        entries.add("lm_head.weight", tensors.get("model.embed_tokens.weight").to(dtype), FLOAT)
    if layout == "slimquant":
        writer = ModelSlimWriter(dst, model_quant_type, kv_cache_type="C8" if kv_cache else None)
        for name, t, qtype in entries:
            writer.add(name, t, qtype)
        writer.close()
    else:
        _save_modelslim(dst, entries, layout, kv_cache is not None, model_quant_type)
    return dst


def _add_kv_cache_scales(entries: _Entries, config: dict, kind: str, gen: torch.Generator, layout: str) -> None:
    """Per layer, k / v scales [KVH * D] around the tiny models' max |k| and |v| (1.2 .. 2.8) / 127."""
    assert kind in ("sym", "asym"), kind
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    channels = config["num_key_value_heads"] * head_dim
    for i in range(config["num_hidden_layers"]):
        for proj in ("k_proj", "v_proj"):
            scale = (1.2 + 1.6 * torch.rand(channels, generator=gen)) / 127
            offset = torch.zeros(channels) if kind == "sym" else torch.randint(-8, 9, (channels,), generator=gen)
            offset = offset.to(torch.int32 if layout == "v1" else torch.float32)
            entries.add(f"model.layers.{i}.self_attn.{proj}.kv_cache_scale", scale, "C8")
            entries.add(f"model.layers.{i}.self_attn.{proj}.kv_cache_offset", offset, "C8")


class _Entries(list):
    """(name, tensor, description type) in write order."""

    def add(self, name: str, t: torch.Tensor, qtype: str) -> None:
        self.append((name, t, qtype))


def _as_layout(out: dict[str, torch.Tensor], qtype: str, dtype: torch.dtype, layout: str) -> dict[str, torch.Tensor]:
    """One quantized linear's tensors in the saver's order and dtypes."""
    if layout == "v0" and qtype == "W8A8" and dtype == torch.bfloat16:  # the older saver's bf16 activation params
        return out | {"input_scale": out["input_scale"].bfloat16(), "input_offset": out["input_offset"].bfloat16()}
    if layout != "v1":
        return out
    bias = {} if "bias" not in out else {"bias": out["bias"].float()}
    if qtype in ("W8A8_DYNAMIC", "W8A16"):
        return {k: out[k] for k in ("weight", "weight_scale", "weight_offset")} | bias
    return {k: out[k] for k in ("weight", "quant_bias", "input_scale", "input_offset", "deq_scale")} | bias


def _save_modelslim(
    dst: Path, entries: _Entries, layout: str, kv_cache: bool = False, model_quant_type: str = "W8A8"
) -> None:
    """One shard, its index and the description, named and ordered as the V0 or V1 saver does."""
    from safetensors.torch import save_file

    types = {name: qtype for name, _, qtype in entries}
    stem = "quant_model_weights" if layout == "v1" else f"quant_model_weight_{model_quant_type.lower()}"
    shard = f"{stem}-00001-of-00001.safetensors"
    save_file({name: t.contiguous() for name, t, _ in entries}, str(dst / shard))
    size = sum(t.numel() * t.element_size() for _, t, _ in entries)
    index = {"metadata": {"total_size": size}, "weight_map": dict.fromkeys(types, shard)}
    (dst / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    kv = {"kv_cache_type": "C8", "kv_quant_type": "C8"} if kv_cache else {}
    if layout == "v1":
        header = {"version": "1.0.0", "model_quant_type": model_quant_type, "metadata": {}, "group_size": 0}
        header |= {"optional": {}}
        description, indent = types | kv | header, 4
    else:
        description, indent = {"version": "1.0.0", "model_quant_type": model_quant_type} | kv | types, 2
    (dst / "quant_model_description.json").write_text(json.dumps(description, indent=indent))


def _random_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return 0.1 * torch.randn(t.shape, generator=gen)


def _activation_params(prefix: str, cache: dict, gen: torch.Generator) -> tuple[float, float]:
    """(input_scale, input_offset) from a random asymmetric range; shared within a fused input group."""
    parent, _, leaf = prefix.rpartition(".")
    key = (parent, INPUT_GROUP.get(leaf, leaf))
    if key not in cache:
        lo, hi = -0.5 - 2.5 * torch.rand(1, generator=gen).item(), 0.5 + 4 * torch.rand(1, generator=gen).item()
        cache[key] = P.static_activation_params(lo, hi)
    return cache[key]


def _quantized(w, bias, qtype, params, dtype, deq_int64) -> dict[str, torch.Tensor]:
    """The tensors docs/FORMAT.md lists for one quantized linear, in write order."""
    if qtype == "W8A16":
        return _weight_only(w, bias, dtype)
    w_q, w_scale = P.quantize_weight(w)
    out = {"weight": w_q}
    if bias is not None:
        out["bias"] = bias.to(dtype)
    out["weight_scale"], out["weight_offset"] = w_scale, torch.zeros_like(w_scale)
    if qtype == "W8A8_DYNAMIC":
        return out
    scale, offset = params
    deq = P.deq_scale(scale, w_scale, dtype)
    if deq_int64 is not None:  # force one stored form regardless of the model dtype
        deq = P.deq_scale(scale, w_scale, torch.float16 if deq_int64 else torch.bfloat16)
    out["input_scale"], out["input_offset"] = torch.tensor([scale]), torch.tensor([offset])
    out["quant_bias"], out["deq_scale"] = P.quant_bias(bias, deq, w_q, offset), deq
    return out


def _weight_only(w, bias, dtype) -> dict[str, torch.Tensor]:
    """W8A16 with asymmetric weights (ModelSlim's w_sym=False), so the offset matters: w ~ (w_q + offset) * scale."""
    lo, hi = w.float().aminmax(dim=1, keepdim=True)  # [N, 1] each
    scale = ((hi - lo) / 255).clamp(min=1e-8)
    zero = torch.round(-lo / scale) - 128
    w_q = (torch.round(w.float() / scale) + zero).clamp(-128, 127).to(torch.int8)
    out = {"weight": w_q} | ({} if bias is None else {"bias": bias.to(dtype)})
    return out | {"weight_scale": scale, "weight_offset": -zero}
