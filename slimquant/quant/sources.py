"""Lazy readers of source checkpoints: safetensors folders (bf16/fp16/fp32, FP8 block-quantized).

Tensors are read one at a time with plain file reads (no mmap: mapped pages would count towards the
process's memory for as long as the file stays open), so memory never holds more than the tensor asked for.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from slimquant.quant.shard_stream import SAFETENSORS_DTYPES

FP8_BLOCK = 128


class SafetensorsFolder:
    """Lazy, name-addressed access to every tensor in a folder of safetensors files (read one at a time)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._where = _locate_tensors(self.path)

    def keys(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (a fresh copy read from its file)."""
        if name not in self._where:
            raise KeyError(name)
        return _read_tensor(self.path / self._where[name], name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time."""
        for name in self._where:
            yield name, self.get(name)


def _read_tensor(file: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file via its header offsets: [8-byte length][JSON header][data]."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(n))[name]
        start, end = info["data_offsets"]
        dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        f.seek(8 + n + start)
        buf = bytearray(end - start)
        if f.readinto(buf) != len(buf):
            raise ValueError(f"cannot read {name!r} from {file}: the file is truncated")
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _locate_tensors(path: Path) -> dict[str, str]:
    """Map tensor name -> file name, from the index if present else from every *.safetensors header."""
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    where: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(str(path / file), framework="pt") as f:
                where.update({k: file for k in f.keys()})
        except Exception as e:
            raise ValueError(f"cannot read {path / file}: {e}; the file is corrupt or truncated") from e
    _check_index(path, where)
    return where


def _check_index(path: Path, where: dict[str, str]) -> None:
    """If an index names files or tensors that are not on disk, say which ones are missing."""
    for index_file in path.glob("*.safetensors.index.json"):
        weight_map = json.loads(index_file.read_text()).get("weight_map", {})
        missing_files = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing_files:
            raise ValueError(f"{index_file.name} lists shards that are missing from {path}: {missing_files}")
        missing = [k for k in weight_map if k not in where]
        if missing:
            raise ValueError(f"{index_file.name} lists tensors that no shard holds: {missing[:5]}")


def dequantize_fp8_block(w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """FP8 block dequant: w [M, N] fp8 * scale_inv [ceil(M/b), ceil(N/b)] repeated b x b -> bf16 [M, N]."""
    m, n = w.shape
    s = scale_inv.float().repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)[:m, :n]  # [M, N]
    return (w.float() * s).to(torch.bfloat16)


class HFCheckpoint:
    """A Hugging Face model folder: config.json plus safetensors, FP8 block weights dequantized on read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"{path} is not a folder; pass a Hugging Face model folder or a .gguf file")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path} has no config.json; is it a Hugging Face model folder?")
        self.config: dict = json.loads(config_file.read_text())
        self.tensors = SafetensorsFolder(self.path)
        self._scale_inv = {k[: -len("_scale_inv")] for k in self.tensors.keys() if k.endswith(".weight_scale_inv")}

    @property
    def is_fp8(self) -> bool:
        """True if some weights are FP8 block-quantized (they carry a weight_scale_inv)."""
        return bool(self._scale_inv)

    def keys(self) -> list[str]:
        """Every logical tensor name (scale_inv companions hidden)."""
        return [k for k in self.tensors.keys() if not k.endswith(".weight_scale_inv")]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors and not name.endswith(".weight_scale_inv")

    def get(self, name: str) -> torch.Tensor:
        """One tensor in float: FP8 weights come back dequantized to bf16."""
        t = self.tensors.get(name)
        if name in self._scale_inv:
            return dequantize_fp8_block(t, self.tensors.get(name + "_scale_inv"))
        return t
