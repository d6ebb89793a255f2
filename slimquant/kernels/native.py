"""The native CPU kernels (csrc/*.cpp, AVX2 or AVX-512 VNNI): built once with the system C++ compiler into one
library, loaded by ctypes.

The library lands in $SLIMQUANT_CACHE/kernels (default ~/.cache/slimquant/kernels) under a name that hashes
the source and the flags, so an edit rebuilds it. Where there is no compiler, no AVX2, or
SLIMQUANT_NATIVE=0, `library()` returns None and the callers keep the pure-torch path (logged once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from slimquant.kernels.cpu import cpu_flags

logger = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))  # int8 GEMM, attention, norm, greedy screen
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))  # part of the cache key, not compiled alone
FLAGS = ["-O3", "-std=c++17", "-mavx2", "-mfma", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared"]
K_ALIGN = 32  # the kernel reads K in steps of 32 bytes (VNNI: 64, then one 32): weights are padded to it
# Extra flags per instruction set; the AVX2 flags above stay in every build (the quantization loops use them).
ISA_FLAGS = {
    "avx2": [],
    "avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-DSQ_AVX512VNNI"],
}
_VNNI_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
_ABI_VERSION = 1

_i, _p, _f, _d = ctypes.c_int, ctypes.c_void_p, ctypes.c_float, ctypes.c_double
_SIGNATURES = {
    "sq_int8_gemm": [_p, _i, _i, _i, _p, _i, _i, _p],
    "sq_dynamic_linear": [_p, _i, _i, _i, _p, _i, _i, _p, _p, _p],
    "sq_static_linear": [_p, _i, _i, _i, _f, _f, _p, _i, _i, _p, _p, _p],
    "sq_quantize_per_token": [_p, _i, _i, _i, _p, _p],
    "sq_bf16_linear": [_p, _i, _i, _i, _p, _i, _p, _p],
    "sq_decode_attention": [_p, _i, _p, _i, _p, _i, _p, _p, _p, _p, _i, _p, _p, _i, _p, _i, _i, _i, _i, _i, _f, _p],
    "sq_add_rms_norm": [_p, _i, _i, _i, _p, _i, _p, _p, _f, _p, _p],
    "sq_rms_norm_heads": [_p, _i, _i, _i, _i, _p, _p, _f, _p, _i],
    "sq_silu_and_mul": [_p, _i, _i, _i, _p],
    "sq_greedy_argmax": [_p, _i, _i, _i, _p, _i, _i, _p, _p, _d, _d, _p],
    "sq_topk_screen": [_p, _i, _i, _i, _p, _i, _i, _p, _p, _d, _d, _i, _i, _p, _p, _p],
    "sq_decoder_model": [_p, _p, _p, _i, _i, _i, _p, _p, _i, _p, _p, _p, _i, _p, _p, _f, _p, _p, _p, _i, _p, _i],
}

_RETURNS = {"sq_greedy_argmax": _i, "sq_topk_screen": _i}  # the others return nothing


def cache_dir() -> Path:
    """Where built kernels are kept."""
    root = os.environ.get("SLIMQUANT_CACHE") or Path.home() / ".cache" / "slimquant"
    return Path(root) / "kernels"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it cannot run here (the reason is logged once)."""
    reason = _unavailable_reason()
    if reason is None:
        try:
            return _load(_build())
        except subprocess.CalledProcessError as err:
            tail = err.stderr.decode(errors="replace").strip().splitlines()[-3:]
            reason = f"compiling {SOURCES[0].parent} failed: {' | '.join(tail)}"
        except OSError as err:
            reason = f"loading the kernel library failed: {err}"
    logger.warning("native kernels off (%s); the pure-torch paths run instead (slower)", reason)
    return None


def available() -> bool:
    """True when the native kernels are loaded."""
    return library() is not None


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] with unit stride along K and rows that do not overlap (the kernels' layout); copied if not."""
    return x if x.stride(-1) == 1 and x.stride(0) >= x.shape[1] else x.contiguous()


def _unavailable_reason() -> str | None:
    if os.environ.get("SLIMQUANT_NATIVE", "1") == "0":
        return "SLIMQUANT_NATIVE=0"
    if "avx2" not in cpu_flags():
        return "this CPU has no AVX2"
    if _compiler() is None:
        return "no C++ compiler found (install g++ or set CXX)"
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def isa() -> str:
    """The instruction set the kernels are built for: "avx512vnni" where the CPU has it, else "avx2".

    SLIMQUANT_ISA=avx2 forces the AVX2 build (to test or compare it on a VNNI machine).
    """
    forced = os.environ.get("SLIMQUANT_ISA")
    if forced:
        if forced not in ISA_FLAGS:
            raise ValueError(f"SLIMQUANT_ISA={forced!r}: expected one of {sorted(ISA_FLAGS)}")
        return forced
    return "avx512vnni" if cpu_flags() >= _VNNI_CPU_FLAGS else "avx2"


@functools.cache
def library_for(target: str) -> ctypes.CDLL:
    """A library built for the given instruction set (one of ISA_FLAGS), whatever isa() picks: tests, benchmarks."""
    return _load(_build(target))


def _build(target: str | None = None) -> Path:
    """Compile the source unless a library built from the same source and flags is cached."""
    flags = FLAGS + ISA_FLAGS[target or isa()]
    source = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    tag = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    out = cache_dir() / f"slimquant_cpu-{tag}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        sources = [str(p) for p in SOURCES]
        subprocess.run([_compiler(), *flags, *sources, "-o", str(staged)], check=True, capture_output=True)
        os.replace(staged, out)  # atomic: a concurrent build never sees half a file
    logger.info("built native kernels: %s", out)
    return out


def _load(path: Path) -> ctypes.CDLL:
    torch.get_num_threads()  # torch's OpenMP runtime first: the library shares it (same soname)
    lib = ctypes.CDLL(str(path))
    if lib.sq_abi_version() != _ABI_VERSION:
        raise OSError(f"{path} has ABI {lib.sq_abi_version()}, expected {_ABI_VERSION}")
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, _RETURNS.get(name)
    return lib
