"""Keep freed CPU memory inside the process, so that large tensors reuse warm pages.

glibc's ``malloc`` serves every block above its mmap threshold (128 KiB, growing to at most 32 MiB) with
a fresh ``mmap`` and returns it to the kernel on ``free``; it also trims the top of the heap back to the
kernel. A training or evaluation step allocates and frees the same activation sizes again and again, so
each step then page-faults its activations in anew: one minor fault per 4 KiB page (about 1.6 µs each on
the project's CPU machines, 1.6-2.4 million faults per evaluation of 10,000 Fashion-MNIST images at
batch 1000, which cost that evaluation half to two thirds of its throughput). ``keep_freed_memory()`` raises both thresholds with ``mallopt``, so
freed blocks stay in the heap and the next step finds its pages mapped. The cost is resident memory: the
process keeps its peak working set until it exits.

Only the ``pdenet`` commands call it (a library import changes no process-wide setting). It is a no-op
where the C library is not glibc (macOS, Windows, musl) and for CUDA tensors, which PyTorch caches itself.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1   # mallopt parameter numbers, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20   # bytes: blocks below this come from the heap
TRIM_THRESHOLD = 1 << 30     # bytes of free heap top kept before trimming

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to 256 MiB and its trim threshold to 1 GiB; True if both were accepted.

    Idempotent; returns False (and changes nothing) where the C library is not glibc."""
    global _applied
    if _applied is None:
        _applied = _set_thresholds()
    return _applied


def _set_thresholds() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
