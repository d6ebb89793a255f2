"""Fixtures for the quantizer tests: cached quantize() runs on the tiny models."""

from __future__ import annotations

import pytest

from slimquant.quant.pipeline import quantize
from tests.quant.common import FAST


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
