"""Host memory: keep what a CPU step frees for the next step, instead of handing it back to the OS.

glibc's malloc serves every block above its mmap threshold (128 KiB, rising with the blocks freed to at most
32 MiB) with fresh pages from the kernel, and hands the top of its heap back once more than its trim threshold is
free there. A training step allocates and frees the same tensors every step, so by default it pays, every step, a
page fault per 4 KiB of them and the kernel's zeroing of those pages. Measured on this project's 2-core CPU (one
thread; docs/performance.md, ``scripts/bench_hostmem.py``): the tiny preset's stage-1 step from images spent a
seventh of its time in the kernel, and the paper-width denoiser's bf16 training step over 40%.

:func:`keep_freed_memory` sets both thresholds to their maximum, so blocks come from the heap and freed memory
stays there for reuse, as jemalloc or tcmalloc would keep it (PyTorch's CPU tuning guide recommends preloading one
of them for this reason). The cost: the process keeps its peak heap resident until it exits. Values computed are
the same either way; only where the bytes come from changes. The CLI applies it at start when no GPU is visible
(a GPU run's step tensors live on the device, and its host would only keep memory it touched once, such as weights
built on the CPU); ``GENHANCER_KEEP_FREED_MEMORY=0`` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os

ENV = "GENHANCER_KEEP_FREED_MEMORY"
kept = False  # whether this process keeps freed memory (set by keep_freed_memory; benchmarks print it)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
LIMIT = 2**31 - 1  # mallopt takes a C int


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve blocks from its heap and keep freed memory for reuse. Returns whether it applied:
    False with another C library (macOS, Windows, musl), or when ``$GENHANCER_KEEP_FREED_MEMORY`` is ``0``."""
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own C library
        libc.gnu_get_libc_version  # noqa: B018  # present in glibc only: mallopt elsewhere means something else
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global kept
    kept = mallopt(M_MMAP_THRESHOLD, LIMIT) == 1 and mallopt(M_TRIM_THRESHOLD, LIMIT) == 1
    return kept


def keep_freed_memory_without_gpu() -> bool:
    """:func:`keep_freed_memory` unless a GPU is visible to torch: the CLI's policy (and the benchmarks', to measure
    what it runs). Returns whether freed memory is kept."""
    import torch

    return not torch.cuda.is_available() and keep_freed_memory()
