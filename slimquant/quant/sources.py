"""Lazy readers of source checkpoints: safetensors folders (bf16/fp16/fp32, FP8 block-quantized).

Tensors are read one at a time through safetensors' mmap, so memory never holds the whole model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

FP8_BLOCK = 128


class SafetensorsFolder:
    """Lazy, name-addressed access to every tensor in a folder of safetensors files (mmap, one at a time)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._where = _locate_tensors(self.path)
        self._handles: dict[str, object] = {}

    def keys(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (a copy, independent of the file mapping)."""
        if name not in self._where:
            raise KeyError(name)
        return self._handle(self._where[name]).get_tensor(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time."""
        for name in self._where:
            yield name, self.get(name)

    def release(self) -> None:
        """Close the open files: their mapped pages stop counting towards this process's memory."""
        self._handles.clear()

    def _handle(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"cannot read {self.path / file}: {e}; the file is corrupt or truncated") from e
        return self._handles[file]


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

    def release(self) -> None:
        """Close the open safetensors files (reopened on the next read)."""
        self.tensors.release()

    def get(self, name: str) -> torch.Tensor:
        """One tensor in float: FP8 weights come back dequantized to bf16."""
        t = self.tensors.get(name)
        if name in self._scale_inv:
            return dequantize_fp8_block(t, self.tensors.get(name + "_scale_inv"))
        return t
