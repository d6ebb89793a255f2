"""The quantizer's source: a Hugging Face folder (bf16/fp16/fp32, FP8 block-quantized weights dequantized on read)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from slimquant.format.safetensors_io import SafetensorsFolder

FP8_BLOCK = 128


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
