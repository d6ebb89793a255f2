"""Float dtypes by name: what dtype= / kv_cache_dtype= accept and what config.json's dtype names."""

from __future__ import annotations

import torch

FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_NAMES = ("auto", *FLOAT_DTYPES, *ALIASES)  # dtype= (vLLM's names and the short ones)


def float_dtype(name: str | torch.dtype) -> torch.dtype | None:
    """'bfloat16' / 'bf16' / 'torch.bfloat16' / torch.bfloat16 -> torch.bfloat16; None for anything else."""
    if isinstance(name, torch.dtype):
        return name if name in FLOAT_DTYPES.values() else None
    key = str(name).removeprefix("torch.")
    return FLOAT_DTYPES.get(ALIASES.get(key, key))


def names_of(*dtypes: torch.dtype) -> tuple[str, ...]:
    """Every name in DTYPE_NAMES (but 'auto') that means one of dtypes."""
    return tuple(n for n in DTYPE_NAMES if n != "auto" and float_dtype(n) in dtypes)
