"""What this CPU computes natively (read once from /proc/cpuinfo)."""

from __future__ import annotations

import functools
from pathlib import Path

_HALF_FLAGS = {"avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16"}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is unavailable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name ('' where /proc/cpuinfo does not say)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    return names[0] if names else ""


def has_native_half() -> bool:
    """True if bf16/fp16 matmuls run in hardware here (AVX512-BF16/FP16 or AMX); else torch emulates them slowly."""
    return bool(cpu_flags() & _HALF_FLAGS)
