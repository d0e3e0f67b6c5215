"""Keep freed CPU memory in the process instead of handing it back to the kernel every step.

PyTorch's CPU tensors come from the C allocator. glibc returns freed memory at the top of its
heap to the kernel once more than `M_TRIM_THRESHOLD` is free there, and serves large blocks
with their own `mmap`, unmapped again on free. A training step frees most of what it
allocated, so by default the next step maps the same memory again and takes one page fault
per 4 KiB page it touches: an MoE layer's expert-ordered buffers ([T·k, D] rows) cost
thousands of faults per step, a measurable part of its time.

`retain_freed_memory()` raises both thresholds (mmap only for blocks over 32 MiB, the most
glibc allows; the heap is trimmed only when over 2 GiB of it is free), so a process reuses
its own peak working set, the way GPU caching allocators do. Resident memory then stays at
the peak of a step instead of falling between steps. It is a no-op where the C library is
not glibc. `MOESAIC_MALLOC=default` leaves the C allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only past 2 GiB free at the top

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Apply the thresholds once per process; True when they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MOESAIC_MALLOC", "").lower() == "default" or not sys.platform.startswith(
        "linux"
    ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    _applied = ok
    return ok
