"""Keep freed tensor memory in the process on CPU runs (glibc's malloc), instead of giving it back.

PyTorch's CPU tensors come from ``malloc``. glibc serves every block above its mmap threshold (at most
32 MB) with a fresh ``mmap`` and returns it with ``munmap`` on free, so each large activation of a
forward or backward pass (an FPN level of 800x1216 is 62 MB) is paid again in page faults, the kernel
zeroing every 4 KB page on first touch. Measured on SCNet R-50 (2 CPU threads, 800x1216): 1.5 s of a
6.7 s inference and 1.2 s of an 8.3 s training step (scripts/benchmark.py, README). With mmap off and
heap trimming raised, freed blocks are reused from the heap: the same arithmetic, same results, in
exchange for a peak resident set that stays allocated (+15 to 20% here).

Applied by the scripts when they compute on the CPU; ``SCNET_KEEP_FREED_MEMORY=0`` turns it off. In a
notebook, call :func:`keep_freed_memory` once. Other C libraries (musl, macOS) are left alone.
"""
import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # the largest int: free memory at the top of the heap is kept up to 2 GB


def keep_freed_memory():
    """Turn off glibc's mmap for large blocks and its trimming of the heap. Returns True when applied."""
    if os.environ.get("SCNET_KEEP_FREED_MEMORY", "1") == "0" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl accepts mallopt but ignores it
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
