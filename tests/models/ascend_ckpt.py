"""Test helper: turn a tiny float HF folder into an ascend (ModelSlim) checkpoint with chosen quant types.

Written directly with the quant primitives and ModelSlimWriter (not the project's quantizer), with random
but calibrated-looking static activation parameters (non-zero input_offset).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from slimquant.format import primitives as P
from slimquant.format.checkpoint import ModelSlimWriter
from slimquant.format.safetensors_io import SafetensorsFolder
from slimquant.format.schemes import FLOAT

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
) -> Path:
    """Write dst from src; quant_type(linear prefix) -> "W8A8" | "W8A8_DYNAMIC" | "FLOAT".

    shift=True mimics the anti-outlier shift: every layernorm gets a bias and every linear it feeds gets one.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy(f, dst / f.name)
    tensors, gen = SafetensorsFolder(src), torch.Generator().manual_seed(seed)
    writer, act_params = ModelSlimWriter(dst, "W8A8"), {}
    for name in tensors.keys():
        prefix, _, leaf = name.rpartition(".")
        linear = prefix.rpartition(".")[2]
        if linear not in LINEARS:
            writer.add(name, tensors.get(name).to(dtype), FLOAT)
            if shift and name.endswith("layernorm.weight"):
                writer.add(f"{prefix}.bias", _random_like(tensors.get(name), gen).to(dtype), FLOAT)
            continue
        if leaf != "weight":
            continue  # a linear's bias is written with its weight
        w, qtype = tensors.get(name), quant_type(prefix)
        bias = tensors.get(f"{prefix}.bias") if f"{prefix}.bias" in tensors else None
        if bias is None and shift and linear in INPUT_GROUP:
            bias = _random_like(w[:, 0], gen)
        if qtype == FLOAT:
            out = {"weight": w.to(dtype)} | ({} if bias is None else {"bias": bias.to(dtype)})
        else:
            out = _quantized(w, bias, qtype, _activation_params(prefix, act_params, gen), dtype, deq_int64)
        for key, t in out.items():
            writer.add(f"{prefix}.{key}", t, FLOAT if qtype == FLOAT or key == "bias" else qtype)
    writer.close()
    return dst


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
