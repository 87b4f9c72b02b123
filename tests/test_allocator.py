"""`keep_freed_memory`: glibc serves blocks under 32 MB from its heap and keeps them when freed.

Checked in a child process (mallopt's settings last for the process) with glibc's own accounting,
`mallinfo2`: a 16 MB block comes from the heap rather than its own mmap, and freeing it leaves the
heap its size. How many page faults a training step then saves varies with glibc's dynamic thresholds
from run to run, so that figure is measured by `benchmarks/train_speed.py --breakdown`, not here.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CHILD = """
import ctypes, ctypes.util, json, sys
from bnpipe.train.allocator import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2()
block = libc.malloc(16 << 20)
ctypes.memset(block, 1, 16 << 20)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"kept": kept, "mmapped": during.hblkhd - before.hblkhd, "heap_after_free": after.arena}))
"""


def _child(mode: str) -> dict[str, int]:
    import json

    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and mallinfo2 are glibc's")
def test_blocks_under_32_mb_come_from_the_heap_and_stay() -> None:
    keep, default = _child("keep"), _child("default")
    assert keep["kept"] is True
    assert keep["mmapped"] == 0 and keep["heap_after_free"] >= 16 << 20, keep
    # glibc's default (128 KB threshold at start): the same block is an mmap of its own, unmapped when freed.
    assert default["mmapped"] >= 16 << 20, default
