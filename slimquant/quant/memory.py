"""This process's memory: its peak so far, and handing freed heap back to the OS."""

from __future__ import annotations

import contextlib
import ctypes
import resource


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def return_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise, and peak memory would creep layer by layer)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
