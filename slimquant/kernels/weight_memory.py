"""Runtime weights in memory backed by 2 MiB pages, where the kernel allows it (transparent huge pages).

Decode reads every weight once per token. With 4 KiB pages a 135M-parameter model spans ~40,000 pages, and
in a virtual machine each TLB miss is a nested page walk: a one-token GEMV streamed ~19 GB/s from 4 KiB pages
and ~31 GB/s from 2 MiB pages on one core here. Weights are carved out of large chunks that are marked
MADV_HUGEPAGE before they are first touched; where the kernel has THP off (or no madvise), nothing changes.
KernelConfig.hugepages=False (SLIMQUANT_HUGEPAGES=0) makes NativeOps allocate plain memory instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math

import torch

HUGE_PAGE = 2 << 20
CHUNK = 32 << 20  # bytes per chunk: at most one partly used huge page of waste per chunk
_ALIGN = 64  # each tensor starts on a cache line
_MADV_HUGEPAGE = 14


class _Arena:
    """Hands out aligned slices of the current chunk; a new chunk when it is full (the old one lives on in its
    slices: each slice is a view that keeps its chunk's storage alive)."""

    def __init__(self):
        self.chunk: torch.Tensor | None = None
        self.used = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 view of nbytes, 64-byte aligned, in huge-page-backed memory where possible."""
        start = -(-self.used // _ALIGN) * _ALIGN
        if self.chunk is None or start + nbytes > self.chunk.numel():
            self.chunk, start = _huge_chunk(max(CHUNK, nbytes)), 0
        self.used = start + nbytes
        return self.chunk[start : start + nbytes]


_ARENA = _Arena()


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Like torch.empty(shape, dtype=dtype) on the CPU, in huge-page-backed memory where the kernel allows."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _ALIGN:
        return torch.empty(shape, dtype=dtype)
    return _ARENA.take(nbytes).view(dtype).view(shape)


def _huge_chunk(nbytes: int) -> torch.Tensor:
    """nbytes of fresh (untouched) memory whose 2 MiB-aligned part is marked MADV_HUGEPAGE."""
    buf = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # large: fresh pages from mmap, not yet touched
    offset = -buf.data_ptr() % HUGE_PAGE
    chunk = buf[offset : offset + nbytes]
    libc = _libc()
    if libc is not None:
        whole_pages = nbytes // HUGE_PAGE * HUGE_PAGE
        libc.madvise(ctypes.c_void_p(chunk.data_ptr()), ctypes.c_size_t(whole_pages), _MADV_HUGEPAGE)
    return chunk


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.madvise.argtypes, libc.madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return libc
