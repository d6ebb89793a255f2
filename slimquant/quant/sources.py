"""The quantizer's source: a Hugging Face folder of float weights (bf16 / fp16 / fp32), or of 8-bit weights with
their scales, dequantized to bf16 on read: FP8 blocks (DeepSeek-V3, Kimi-K2, Qwen3-FP8: `weight_scale_inv`), vLLM's
per-tensor FP8, and llm-compressor's compressed-tensors FP8 or int8 (its FP8_DYNAMIC / W8A8 recipes: `weight_scale`
per channel, per tensor or per block). Other quantized releases (int4 GPTQ / AWQ, bitsandbytes,
MXFP4 ...) are refused by name: their float weights cannot be recovered here."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from slimquant.format.safetensors_io import SafetensorsFolder

FP8_BLOCK = 128
EIGHT_BIT = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)
_COMPANIONS = (".input_scale", ".weight_zero_point", ".input_zero_point")  # compressed-tensors' other tensors
_CT_FORMATS = ("float-quantized", "int-quantized", "naive-quantized")  # 8-bit weights stored as they are


@dataclass(frozen=True)
class WeightScales:
    """How a source's 8-bit weights carry their scales: the scale tensor's name suffix after the weight's name
    (`_scale_inv` or `_scale`), and the [rows, columns] each scale covers (None: the scale broadcasts, one per output
    row or one for the tensor)."""

    suffix: str
    block: tuple[int, int] | None


_DEEPSEEK_BLOCKS = WeightScales("_scale_inv", (FP8_BLOCK, FP8_BLOCK))


def dequantize_weight(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """w fp8 / int8 [M, N] times its scale -> bf16 [M, N]: per block (scale [ceil(M/bm), ceil(N/bn)] repeated
    bm x bn), per output row (scale [M] or [M, 1]) or per tensor (one value); ValueError for another shape."""
    m, n = w.shape
    if block is not None:
        bm, bn = block
        if tuple(scale.shape) != (math.ceil(m / bm), math.ceil(n / bn)):
            raise ValueError(f"a weight [{m}, {n}] in blocks of {bm} x {bn} has scales of shape {list(scale.shape)}")
        s = scale.float().repeat_interleave(bm, dim=0).repeat_interleave(bn, dim=1)[:m, :n]  # [M, N]
    elif scale.numel() in (1, m):
        s = scale.float().reshape(-1, 1)  # [M or 1, 1]
    else:
        raise ValueError(f"a weight [{m}, {n}] has {scale.numel()} scales: neither one per row nor one in all")
    return (w.float() * s).to(torch.bfloat16)


def weight_scales(config: dict, path: Path) -> WeightScales | None:
    """The scales of the 8-bit weights config.json's quantization_config describes (None: a float checkpoint), or
    ValueError for a quantization whose weights cannot be dequantized here."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"{path}/config.json: quantization_config is {qc!r}, not an object")
    method = qc.get("quant_method")
    if method == "fp8":  # DeepSeek / Qwen3 blocks, or vLLM's serialized per-tensor FP8
        block = qc.get("weight_block_size")
        return WeightScales("_scale_inv", (int(block[0]), int(block[1]))) if block else WeightScales("_scale", None)
    if method == "compressed-tensors":
        return _compressed_tensors_scales(qc, path)
    raise ValueError(
        f"{path} is a {method!r}-quantized checkpoint (config.json's quantization_config): slimquant quantizes from "
        "float weights, or from FP8 / int8 ones with their scales (quant_method 'fp8', or 'compressed-tensors' "
        "float- or int-quantized). Start from the model's bf16 or FP8 release"
    )


def _compressed_tensors_scales(qc: dict, path: Path) -> WeightScales:
    """WeightScales of an llm-compressor checkpoint: 8-bit symmetric weights per channel, tensor or block."""
    fmt, groups = qc.get("format"), list((qc.get("config_groups") or {}).values())
    schemes = {_ct_weights(g.get("weights") or {}, fmt, path) for g in groups}
    if fmt not in _CT_FORMATS or len(schemes) != 1:
        why = f"format {fmt!r}" if fmt not in _CT_FORMATS else f"{len(schemes)} weight schemes in its config groups"
        raise ValueError(
            f"{path}: a compressed-tensors checkpoint with {why}; slimquant reads one scheme of 8-bit weights stored "
            f"as they are ({', '.join(_CT_FORMATS)}). Start from the model's bf16 release"
        )
    (block,) = schemes
    return WeightScales("_scale", block)


def _ct_weights(weights: dict, fmt: str, path: Path) -> tuple[int, int] | None:
    """A config group's weight scheme as WeightScales.block, or ValueError where it is not 8-bit symmetric with
    one scale per channel, tensor or block."""
    strategy, bits, symmetric = weights.get("strategy"), weights.get("num_bits"), weights.get("symmetric", True)
    if bits != 8 or not symmetric or strategy not in ("channel", "tensor", "block"):
        raise ValueError(
            f"{path}: compressed-tensors weights of {bits} bits, {'' if symmetric else 'a'}symmetric, per {strategy} "
            f"({fmt}); slimquant dequantizes 8-bit symmetric weights per channel, tensor or block. Start from the "
            "model's bf16 release"
        )
    block = weights.get("block_structure") if strategy == "block" else None
    return (int(block[0]), int(block[1])) if block else None


class HFCheckpoint:
    """A Hugging Face model folder: config.json plus safetensors, 8-bit weights dequantized on read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"{path} is not a folder; pass a Hugging Face model folder or a .gguf file")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path} has no config.json; is it a Hugging Face model folder?")
        self.config: dict = json.loads(config_file.read_text())
        self.tensors = SafetensorsFolder(self.path)
        declared = weight_scales(self.config, self.path)
        self.scales = declared or _DEEPSEEK_BLOCKS  # FP8 blocks with no quantization_config: read as DeepSeek's
        names, suffix = self.tensors.keys(), self.scales.suffix
        self._quantized = {k[: -len(suffix)] for k in names if k.endswith(".weight" + suffix)}
        hidden = {w + suffix for w in self._quantized}
        hidden |= {k for k in names if declared and k.endswith(_COMPANIONS)}
        self._keys = [k for k in names if k not in hidden]
        self._key_set = set(self._keys)  # membership per tensor name: a trillion-parameter MoE has 100k+ names

    def keys(self) -> list[str]:
        """Every logical tensor name (scales and other companions hidden)."""
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._key_set

    def get(self, name: str) -> torch.Tensor:
        """One tensor in float: 8-bit weights come back dequantized to bf16; ValueError for 8-bit weights without
        scales (an already quantized folder)."""
        t = self.tensors.get(name)
        if name in self._quantized:
            return dequantize_weight(t, self.tensors.get(name + self.scales.suffix), self.scales.block)
        if t.dtype in EIGHT_BIT:
            raise ValueError(
                f"{self.path}: {name} is stored as {t.dtype} with no scale that config.json's quantization_config "
                "names; is this folder already quantized (an ascend checkpoint)? slimquant quantizes float weights, "
                "or FP8 / int8 ones with their scales"
            )
        return t
