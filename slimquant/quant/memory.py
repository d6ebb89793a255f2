"""This process's memory: its peak so far, and handing freed heap back to the OS."""

from __future__ import annotations

import contextlib
import ctypes
import resource


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far: Linux's VmHWM, which starts anew at exec (ru_maxrss keeps the
    resident memory the parent had when it forked, so a process spawned by a large one would report that)."""
    with contextlib.suppress(OSError, StopIteration), open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


_M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Make glibc serve every allocation from threshold bytes up with its own mapping, returned to the OS when
    freed. By default glibc raises that threshold to 32 MiB as large blocks come and go, after which tensors of
    a few MiB (an expert's weights, one at a time) live in the heap, cut it up, and the process's peak memory
    wanders from run to run by a large part of what a layer holds."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold)


def return_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise, and peak memory would creep layer by layer)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
