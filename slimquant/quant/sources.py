"""The quantizer's source: a Hugging Face folder of float weights (bf16 / fp16 / fp32), or of quantized weights with
their scales, dequantized to bf16 on read: FP8 blocks (DeepSeek-V3, Kimi-K2, Qwen3-FP8: `weight_scale_inv`), vLLM's
per-tensor FP8, and llm-compressor's compressed-tensors FP8 or int8 (its FP8_DYNAMIC / W8A8 recipes: `weight_scale`
per channel, per tensor or per block) or packed int4 (its W4A16 / W4A16_ASYM / GPTQ / AWQ recipes, and
Kimi-K2-Thinking's int4 release: `weight_packed`, a scale and zero point per group of columns). Other quantized
releases (GPTQ's or AWQ's own formats, bitsandbytes, MXFP4 ...) are refused by name."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from slimquant.format.safetensors_io import SafetensorsFolder

FP8_BLOCK = 128
EIGHT_BIT = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)
# compressed-tensors' other tensors: read beside their weight (zero points, GPTQ's column order) or not needed
_COMPANIONS = (".input_scale", ".weight_zero_point", ".input_zero_point", ".weight_g_idx")
_CT_FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")  # the last: int32 words
_PACKED = "_packed"  # compressed-tensors' pack-quantized: `X.weight_packed` holds the ints of the weight `X.weight`


@dataclass(frozen=True)
class WeightScales:
    """How a source's quantized weights carry their scales: the scale tensor's name suffix after the weight's name
    (`_scale_inv` or `_scale`), the [rows, columns] each scale covers (None: the scale broadcasts, one per output
    row or one for the tensor; (1, G): groups of G columns), for weights packed into int32 words their bits, and
    whether zero points (`_zero_point`, laid out as the scales) are subtracted first."""

    suffix: str
    block: tuple[int, int] | None
    packed_bits: int | None = None
    zero_points: bool = False


_DEEPSEEK_BLOCKS = WeightScales("_scale_inv", (FP8_BLOCK, FP8_BLOCK))


def dequantize_weight(
    w: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] | None,
    zero: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """(w - zero) times scale -> bf16 [M, N], w fp8 / int [M, N]; scale (and zero, the same shape) per block
    ([ceil(M/bm), ceil(N/bn)] repeated bm x bn; with groups [N], column j's block is groups[j], GPTQ's g_idx), per
    output row ([M] or [M, 1]) or per tensor (one value); ValueError for another shape."""
    s = _per_weight(scale, w.shape, block, groups, "scales")
    x = w.float() if s.dim() == 2 else w.float().view(s.shape[0], s.shape[1], -1)  # [M, N] or [M, N / bn, bn]
    if zero is not None:
        x = x - _per_weight(zero, w.shape, block, groups, "zero points")
    return (x * s).to(torch.bfloat16).view(w.shape)


def _per_weight(
    t: torch.Tensor, shape, block: tuple[int, int] | None, groups: torch.Tensor | None, what: str
) -> torch.Tensor:
    """A weight's scales or zero points spread over it: [M, N]; [M, N / bn, 1] over its [M, N / bn, bn] view, for
    blocks that split rows evenly; or [M or 1, 1] to broadcast."""
    m, n = shape
    if block is not None:
        bm, bn = block
        across = math.ceil(n / bn) if groups is None else _groups_named(groups, n)
        if tuple(t.shape) != (math.ceil(m / bm), across):
            raise ValueError(
                f"a weight [{m}, {n}] in blocks of {bm} x {bn}{' (with g_idx)' if groups is not None else ''} has "
                f"{what} of shape {list(t.shape)}"
            )
        rows = t.float().repeat_interleave(bm, dim=0)[:m] if bm > 1 else t.float()  # [M, blocks across]
        if groups is not None:
            return rows[:, groups.long()]  # [M, N]
        return rows[:, :, None] if n % bn == 0 else rows.repeat_interleave(bn, dim=1)[:, :n]
    if groups is not None:
        raise ValueError(f"a weight [{m}, {n}] has a g_idx but no groups of columns")
    if t.numel() in (1, m):
        return t.float().reshape(-1, 1)  # [M or 1, 1]
    raise ValueError(f"a weight [{m}, {n}] has {t.numel()} {what}: neither one per row nor one in all")


def _groups_named(groups: torch.Tensor, n: int) -> int:
    """How many groups a g_idx [N] names (one past its largest), or -1 where it is not one index >= 0 per column."""
    ok = groups.dim() == 1 and groups.numel() == n > 0 and int(groups.min()) >= 0
    return int(groups.max()) + 1 if ok else -1


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
        "float weights, or from FP8 / int8 / int4 ones with their scales (quant_method 'fp8', or "
        "'compressed-tensors' float-, int- or pack-quantized). Start from the model's bf16 or FP8 release"
    )


def _compressed_tensors_scales(qc: dict, path: Path) -> WeightScales:
    """WeightScales of an llm-compressor checkpoint: int / FP8 weights per channel, tensor, block or group, 8-bit
    as they are or int packed into int32 words, int ones with or without zero points."""
    fmt, groups = qc.get("format"), list((qc.get("config_groups") or {}).values())
    schemes = {_ct_weights(g.get("weights") or {}, fmt, path) for g in groups}
    if fmt not in _CT_FORMATS or len(schemes) != 1:
        why = f"format {fmt!r}" if fmt not in _CT_FORMATS else f"{len(schemes)} weight schemes in its config groups"
        raise ValueError(
            f"{path}: a compressed-tensors checkpoint with {why}; slimquant reads one scheme of weights stored "
            f"as {', '.join(_CT_FORMATS)}. Start from the model's bf16 release"
        )
    ((block, bits, symmetric),) = schemes
    return WeightScales("_scale", block, bits if fmt == "pack-quantized" else None, not symmetric)


def _ct_weights(weights: dict, fmt: str, path: Path) -> tuple[tuple[int, int] | None, int, bool]:
    """A config group's weight scheme as (WeightScales.block, bits, symmetric), or ValueError where it is not one
    scale per channel, tensor, block or group of columns, of 8 bits (2 to 8 when int and packed), symmetric unless
    int."""
    strategy, bits, symmetric = weights.get("strategy"), weights.get("num_bits"), weights.get("symmetric", True)
    is_int = weights.get("type", "int") == "int"
    ok_bits = isinstance(bits, int) and (2 <= bits <= 8 if fmt == "pack-quantized" and is_int else bits == 8)
    if not ok_bits or not (symmetric or is_int) or strategy not in ("channel", "tensor", "block", "group"):
        kind = f"{'' if symmetric else 'a'}symmetric {weights.get('type', 'int')}"
        raise ValueError(
            f"{path}: compressed-tensors weights of {bits} bits, {kind}, per {strategy} ({fmt}); slimquant "
            "dequantizes weights per channel, tensor, block or group, of 8 bits (ints of 2 to 8 bits when "
            "pack-quantized), with zero points only when int. Start from the model's bf16 release"
        )
    if strategy == "group":
        size = weights.get("group_size")
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"{path}: compressed-tensors weights per group with group_size {size!r}")
        return (1, size), bits, bool(symmetric)
    block = weights.get("block_structure") if strategy == "block" else None
    return ((int(block[0]), int(block[1])) if block else None), bits, bool(symmetric)


def unpack_ints(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 words [M, W] holding `bits`-bit ints back to back from the lowest bit of each row's first word, each
    stored plus 2^(bits - 1) (compressed-tensors' pack-quantized) -> int8 [M, cols]."""
    rows, words = packed.shape
    if packed.dtype != torch.int32 or words * 32 < cols * bits:
        raise ValueError(f"{cols} ints of {bits} bits do not fit {list(packed.shape)} {packed.dtype} words")
    assert sys.byteorder == "little", "a word's lowest bits are its first byte"
    data = packed.contiguous().view(torch.uint8)  # [M, 4W]
    if bits == 8:
        return (data[:, :cols] ^ 0x80).view(torch.int8)  # minus 128, as int8 reads the top bit
    if 8 % bits == 0:  # 2 or 4 bits: no int straddles two bytes, each below 128
        parts = [(data >> shift) & ((1 << bits) - 1) for shift in range(0, 8, bits)]  # 8 / bits of [M, 4W]
        value = torch.stack(parts, -1).view(rows, -1)[:, :cols]  # [M, cols]
        return value.view(torch.int8) - (1 << (bits - 1))
    data = torch.cat([data, data.new_zeros(rows, 1)], 1)  # [M, 4W + 1]: the last int's next byte
    first_bit = torch.arange(cols) * bits  # [cols]
    low = data[:, first_bit // 8].to(torch.int32)  # [M, cols]: the byte each int starts in, and the next one
    high = data[:, first_bit // 8 + 1].to(torch.int32)
    value = ((low | high << 8) >> (first_bit % 8).to(torch.int32)) & ((1 << bits) - 1)
    return (value - (1 << (bits - 1))).to(torch.int8)


class HFCheckpoint:
    """A Hugging Face model folder: config.json plus safetensors, quantized weights dequantized on read."""

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
        names, suffix, packed = self.tensors.keys(), self.scales.suffix, self.scales.packed_bits is not None
        self._quantized = {k[: -len(suffix)] for k in names if k.endswith(".weight" + suffix)}
        hidden = {w + suffix for w in self._quantized} | {w + "_shape" for w in self._quantized if packed}
        hidden |= {k for k in names if declared and k.endswith(_COMPANIONS)}
        logical = {w + _PACKED: w for w in self._quantized} if packed else {}  # stored name -> the weight's
        self._keys = [logical.get(k, k) for k in names if k not in hidden]
        self._key_set = set(self._keys)  # membership per tensor name: a trillion-parameter MoE has 100k+ names

    def keys(self) -> list[str]:
        """Every logical tensor name (scales and other companions hidden; a packed weight under its own name)."""
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._key_set

    def get(self, name: str) -> torch.Tensor:
        """One tensor in float: quantized weights come back dequantized to bf16; ValueError for 8-bit weights
        without scales (an already quantized folder)."""
        if name in self._quantized:
            ints = self._ints(name)
            zero = self._zero_points(name, ints.shape[0]) if self.scales.zero_points else None
            groups = self.tensors.get(name + "_g_idx") if name + "_g_idx" in self.tensors else None
            return dequantize_weight(ints, self.tensors.get(name + self.scales.suffix), self.scales.block, zero, groups)
        t = self.tensors.get(name)
        if t.dtype in EIGHT_BIT:
            raise ValueError(
                f"{self.path}: {name} is stored as {t.dtype} with no scale that config.json's quantization_config "
                "names; is this folder already quantized (an ascend checkpoint)? slimquant quantizes float weights, "
                "or FP8 / int8 / packed int4 ones with their scales"
            )
        return t

    def _ints(self, name: str) -> torch.Tensor:
        """A quantized weight's stored values [M, N]: as stored, or unpacked from its int32 words."""
        bits = self.scales.packed_bits
        if bits is None:
            return self.tensors.get(name)
        if name + _PACKED not in self.tensors or name + "_shape" not in self.tensors:
            raise ValueError(
                f"{self.path}: {name}{self.scales.suffix} has no {name}{_PACKED} and {name}_shape beside it"
            )
        shape = [int(n) for n in self.tensors.get(name + "_shape").tolist()]
        if len(shape) != 2:
            raise ValueError(f"{self.path}: {name}_shape is {shape}, not the [rows, columns] of a weight")
        ints = unpack_ints(self.tensors.get(name + _PACKED), bits, shape[1])
        if ints.shape[0] != shape[0]:
            raise ValueError(f"{self.path}: {name}{_PACKED} has {ints.shape[0]} rows; {name}_shape says {shape}")
        return ints

    def _zero_points(self, name: str, rows: int) -> torch.Tensor:
        """A weight's zero points, laid out as its scales: as stored, or unpacked from int32 words down each column
        (compressed-tensors packs them along the rows)."""
        if name + "_zero_point" not in self.tensors:
            raise ValueError(
                f"{self.path}: {name} is quantized with zero points (asymmetric) but has no {name}_zero_point"
            )
        zero = self.tensors.get(name + "_zero_point")
        if self.scales.packed_bits is None or zero.dtype != torch.int32:
            return zero
        return unpack_ints(zero.t().contiguous(), self.scales.packed_bits, rows).t()  # [M, groups]
