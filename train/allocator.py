"""Keep glibc's malloc from handing activation memory back to the kernel between training steps.

PyTorch's CPU allocator has no cache: every activation and gradient is a fresh ``malloc``. With
glibc's defaults, blocks of this net's size (0.3-1.2 MB) are served by ``mmap`` or trimmed from
the heap top when freed, so each step may touch them anew: 0 to 750 page faults per step of 64,
depending on where glibc's dynamic thresholds stand, and up to 14% of the step's time on the 2-core
machine (``benchmarks/train_speed.py --breakdown``). Serving them from a heap that is never trimmed
keeps the same memory warm for the next step: 1 or 2 faults per step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it; the preloaded dataset (47 MB) stays mmapped
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Tell glibc to serve blocks under 32 MB from the heap and to keep up to 1 GiB of freed heap.

    Process-wide and lasting; the cost is that the process keeps its peak heap. A no-op off Linux
    or on a C library without ``mallopt`` (musl's does nothing).

    Returns:
        Whether both settings were accepted.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
