"""The native CPU kernels (csrc/*.cpp; builds for AVX2, AVX-512 VNNI, and AMX on top of VNNI): built once with
the system C++ compiler into one library, loaded by ctypes. Its interface comes from the library itself:
csrc/exports.h lists every function and struct once, the compiler checks the definitions against it, and the
library returns those lists as text, from which `Library` builds the ctypes prototypes (callable by parameter
name) and structs (offsets checked).

The library lands in $SLIMQUANT_CACHE/kernels (default ~/.cache/slimquant/kernels) under a name that hashes
the source and the flags, so an edit rebuilds it. Where there is no compiler or no AVX2, `load()` raises
NativeUnavailable with the reason, and the backend "auto" runs torch-reference instead (saying why at load)."""

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

from slimquant.config import cache_root
from slimquant.kernels.cpu import cpu_flags

logger = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))  # int8 GEMM, attention, norm, greedy screen
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))  # part of the cache key, not compiled alone
FLAGS = ["-O3", "-std=c++17", "-mavx2", "-mfma", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared"]
K_ALIGN = 32  # the kernel reads K in steps of 32 bytes (VNNI: 64, then one 32): weights are padded to it
# Extra flags per instruction set; the AVX2 flags above stay in every build (the quantization loops use them).
_VNNI_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-DSQ_AVX512VNNI"]
ISA_FLAGS = {"avx2": [], "avx512vnni": _VNNI_FLAGS, "amx": [*_VNNI_FLAGS, "-mamx-tile", "-mamx-int8", "-DSQ_AMX"]}
ISA_NAMES = {"avx2": "AVX2", "avx512vnni": "AVX-512 VNNI", "amx": "AMX + AVX-512 VNNI"}
# What each build needs of the CPU (/proc/cpuinfo's names)
_CPU_FLAGS = {"avx2": {"avx2"}, "avx512vnni": {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}}
_CPU_FLAGS["amx"] = _CPU_FLAGS["avx512vnni"] | {"amx_tile", "amx_int8"}
_ISA_CODES = {0: "avx2", 1: "avx512vnni", 2: "amx"}  # sq_isa()
_SCALARS = {"int": ctypes.c_int, "int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64, "float": ctypes.c_float}
_SCALARS |= {"double": ctypes.c_double, "const char*": ctypes.c_char_p}


class NativeUnavailable(RuntimeError):
    """The native kernels cannot run here; the message says why."""


def best_isa() -> str:
    """The best native build this CPU runs: "amx" where it has AMX-INT8 (and AVX-512 VNNI), "avx512vnni" where it
    has AVX-512 VNNI, else "avx2"."""
    return next((isa for isa in ("amx", "avx512vnni") if cpu_flags() >= _CPU_FLAGS[isa]), "avx2")


def isas_here() -> list[str]:
    """The builds that run here, AVX2 first: those whose instructions the CPU has, less the AMX build where it
    cannot run (a compiler without AMX, or a Linux that refuses the tile state: a kernel before 5.16)."""
    isas = [isa for isa in ISA_FLAGS if cpu_flags() >= _CPU_FLAGS[isa]]
    if "amx" in isas:
        try:
            load("amx")
        except NativeUnavailable:
            isas.remove("amx")
    return isas


@functools.cache
def load(isa: str = "auto", cache_dir: Path | None = None) -> Library:
    """The kernel library built for isa ("auto": best_isa(), or the VNNI build where the AMX one cannot run),
    compiled once into cache_dir (default: $SLIMQUANT_CACHE/kernels); NativeUnavailable with the reason where it
    cannot run here."""
    if isa != "auto" and isa not in ISA_FLAGS:
        raise ValueError(f"isa must be 'auto' or one of {sorted(ISA_FLAGS)}, got {isa!r}")
    target = best_isa() if isa == "auto" else isa
    if missing := sorted(_CPU_FLAGS[target] - cpu_flags()):
        raise NativeUnavailable(f"this CPU has no {' / '.join(missing)} (the {ISA_NAMES[target]} build's)")
    if _compiler() is None:
        raise NativeUnavailable("no C++ compiler found (install g++ or set CXX)")
    cache_dir = cache_dir or cache_root() / "kernels"
    try:
        return _load_build(target, cache_dir)
    except NativeUnavailable as err:
        if isa != "auto" or target != "amx":
            raise
        logger.warning("%s; using the AVX-512 VNNI build", err)
        return _load_build("avx512vnni", cache_dir)


def _load_build(target: str, cache_dir: Path) -> Library:
    try:
        lib = _load(_build(target, cache_dir))
    except subprocess.CalledProcessError as err:
        tail = err.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise NativeUnavailable(f"compiling {SOURCES[0].parent} failed: {' | '.join(tail)}") from err
    except OSError as err:
        raise NativeUnavailable(f"loading the kernel library failed: {err}") from err
    if target == "amx" and not lib.sq_amx_ready():
        raise NativeUnavailable("the AMX build cannot run: the kernel refused this process the AMX tile state")
    return lib


def available() -> bool:
    """Whether the default build loads here (tests and benchmarks ask; the engine's backend decides itself)."""
    try:
        load()
    except NativeUnavailable:
        return False
    return True


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] with unit stride along K and rows that do not overlap (the kernels' layout); copied if not."""
    return x if x.stride(-1) == 1 and x.stride(0) >= x.shape[1] else x.contiguous()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))  # the standard build variable, as make and pip read it


def _build(target: str, cache_dir: Path) -> Path:
    """Compile the source for target unless a library built from the same source and flags is cached."""
    flags = FLAGS + ISA_FLAGS[target]
    source = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    tag = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    out = cache_dir / f"slimquant_cpu-{tag}.so"
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


def _load(path: Path) -> Library:
    torch.get_num_threads()  # torch's OpenMP runtime first: the library shares it (same soname)
    return Library(ctypes.CDLL(str(path)))


class Library:
    """A loaded kernel library: each exported function as a method with the C parameter names (positional or
    keyword), and its structs by name (`structs["SqStep"]`), all built from the library's own tables."""

    def __init__(self, cdll: ctypes.CDLL):
        self.cdll = cdll
        for name in ("sq_signatures", "sq_struct_layouts"):
            getattr(cdll, name).restype = ctypes.c_char_p
        self.structs = _structs(cdll.sq_struct_layouts().decode())
        for ret, name, params in _signatures(cdll.sq_signatures().decode()):
            setattr(self, name, _bind(getattr(cdll, name), name, ret, params, self.structs))
        self.isa = _ISA_CODES[self.sq_isa()]  # which build this is: a key of ISA_FLAGS


def _signatures(text: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """'void f(const float* x, int m);' lines -> [(return type, name, [(type, parameter name)])]."""
    out = []
    for line in filter(None, text.splitlines()):
        head, _, params = line.rstrip(";").partition("(")
        ret, name = head.rsplit(" ", 1)
        pairs = [p.rsplit(" ", 1) for p in params.rstrip(")").split(", ") if p]
        out.append((ret, name, [(t, n.lstrip("*")) for t, n in pairs]))
    return out


def _ctype(c_type: str, structs: dict[str, type]) -> type | None:
    """The ctypes type of a C type name: scalars, a struct, a pointer to a struct, any other pointer, void."""
    if c_type == "void":
        return None
    if c_type in _SCALARS:
        return _SCALARS[c_type]
    base = c_type.removeprefix("const ").rstrip("*").strip()
    if c_type.count("*") == 1 and base in structs:
        return ctypes.POINTER(structs[base])
    if "*" in c_type:
        return ctypes.c_void_p
    if c_type in structs:
        return structs[c_type]
    raise OSError(f"the kernel library exports a type slimquant cannot map: {c_type!r}")


def _bind(fn, name: str, ret: str, params: list[tuple[str, str]], structs: dict[str, type]):
    """fn with its prototype set, wrapped in a Python function that takes the C parameter names."""
    fn.argtypes = [_ctype(t, structs) for t, _ in params]
    fn.restype = _ctype(ret, structs)
    names = ", ".join(n for _, n in params)
    namespace = {"fn": fn}
    exec(f"def {name}({names}):\n    return fn({names})", namespace)  # a plain call: no per-call checking cost
    return namespace[name]


@functools.cache
def _structs(text: str) -> dict[str, type]:
    """'SqStep 40: int32_t batch 0; ...' lines -> ctypes Structures whose size and offsets equal the C++ ones
    (cached per layout, so every library with this layout shares the classes)."""
    structs: dict[str, type] = {}
    for line in filter(None, text.splitlines()):
        head, _, fields = line.partition(":")
        name, size = head.split()
        parsed = [f.strip().rsplit(" ", 2) for f in fields.split(";") if f.strip()]
        cls = type(name, (ctypes.Structure,), {"_fields_": [(n, _ctype(t, structs)) for t, n, _ in parsed]})
        wrong = [n for t, n, off in parsed if getattr(cls, n).offset != int(off)]
        if ctypes.sizeof(cls) != int(size) or wrong:
            raise OSError(f"struct {name}: ctypes lays out {wrong or 'its size'} unlike the C++ compiler")
        structs[name] = cls
    return structs
