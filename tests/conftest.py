"""Shared fixtures: tiny random models of every architecture, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():  # Triton's interpreter runs the CUDA kernels on CPU tensors (tests/test_kernels):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # set before any test module imports a kernel, in any order

from slimquant.random_models import make_tiny_model

# The fuzzers' budgets: "ci" is fixed (same examples every run) and bounded; "hunt" searches long and at random.
settings.register_profile("ci", max_examples=100, derandomize=True, print_blob=True)
settings.register_profile("hunt", max_examples=2000, derandomize=False, print_blob=True)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch, dtype=torch.float32, **config_overrides) -> folder of a random HF checkpoint (cached)."""
    cache: dict[tuple, Path] = {}

    def build(arch: str, dtype: torch.dtype = torch.float32, **overrides) -> Path:
        key = (arch, dtype, tuple(sorted((name, repr(v)) for name, v in overrides.items())))  # dicts too
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = make_tiny_model(arch, out, dtype=dtype, **overrides)
        return cache[key]

    return build
