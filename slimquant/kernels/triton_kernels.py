"""The CUDA path's optional Triton kernel modules (kernels/cuda_int8.py, kernels/cuda_layers.py), imported on
first use; None where Triton is not installed, and the pure-torch path runs."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def triton_module(name: str) -> ModuleType | None:
    """slimquant.kernels.<name>, or None where Triton is missing (any other import error is raised)."""
    try:
        return importlib.import_module(f"slimquant.kernels.{name}")
    except ModuleNotFoundError as e:
        if e.name != "triton" and not (e.name or "").startswith("triton."):
            raise
        return None
