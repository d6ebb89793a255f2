"""Fixtures for the quantizer tests: cached quantize() runs on the tiny models, and an output reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from slimquant.quant.pipeline import quantize

FAST = dict(num_samples=2, seq_len=16, progress=False)


@pytest.fixture(scope="session")
def quantized(tiny_model, tmp_path_factory):
    """quantized(arch, quant_type, dtype=fp32, **kw) -> (src folder, output folder, summary), cached."""
    import torch

    cache: dict[tuple, tuple] = {}

    def run(arch: str, quant_type: str = "w8a8", dtype=torch.float32, **kw):
        key = (arch, quant_type, dtype, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in cache:
            src = tiny_model(arch, dtype)
            dst = tmp_path_factory.mktemp(f"q-{arch}") / "out"
            cache[key] = (src, dst, quantize(src, dst, quant_type, **{**FAST, **kw}))
        return cache[key]

    return run


def read_output(folder: Path) -> tuple[dict, dict]:
    """(description, {name: tensor}) of a written checkpoint, via its index."""
    desc = json.loads((folder / "quant_model_description.json").read_text())
    (index_file,) = folder.glob("*.safetensors.index.json")
    weight_map = json.loads(index_file.read_text())["weight_map"]
    tensors = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(str(folder / file), framework="pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    return desc, tensors


def read_source(folder: Path) -> dict:
    """{name: tensor} of a source HF folder."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out
