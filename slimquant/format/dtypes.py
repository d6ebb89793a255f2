"""Float dtypes by name: what dtype= / kv_cache_dtype= accept and what config.json's dtype names. The names need no
torch (the CLI lists them without importing it); float_dtype() gives the torch dtype."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CANONICAL = ("bfloat16", "float16", "float32")
ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_NAMES = ("auto", *CANONICAL, *ALIASES)  # dtype= (vLLM's names and the short ones)


def canonical_name(name: object) -> str | None:
    """'bf16' / 'torch.bfloat16' / torch.bfloat16 -> 'bfloat16'; None for anything that is not a float dtype here."""
    key = str(name).removeprefix("torch.")
    key = ALIASES.get(key, key)
    return key if key in CANONICAL else None


def float_dtype(name: str | torch.dtype) -> torch.dtype | None:
    """'bfloat16' / 'bf16' / 'torch.bfloat16' / torch.bfloat16 -> torch.bfloat16; None for anything else."""
    import torch

    key = canonical_name(name)
    return None if key is None else getattr(torch, key)


def names_of(*canonical: str) -> tuple[str, ...]:
    """Every name in DTYPE_NAMES (but 'auto') that means one of the canonical names given."""
    return tuple(n for n in DTYPE_NAMES if n != "auto" and canonical_name(n) in canonical)
