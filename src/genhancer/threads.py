"""The CPU side of a run: torch's thread count (chosen once, printed in the run's summary) and whether the CPU
computes bf16 in hardware.

torch's default (one thread per core) was measured 9x slower than one thread on a 2-core machine busy with other
jobs: threads that wait for a busy core stall every parallel kernel. A CPU run is bit-exact only at the same thread
count (float sums are split differently), so a run that must be reproduced, or resumed bit for bit, should name its
count (``--threads N`` or ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import os

import torch

from .errors import ConfigError


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """``$OMP_NUM_THREADS`` when set, else the CPUs not already busy with other work (load average), at least 1."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = available_cpus()
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(cpus, cpus - busy))


def set_cpu_threads(requested: int | None = None) -> int | None:
    """Set torch's thread count for a CPU run (``requested``, else :func:`default_threads`); returns it, or None when
    a GPU is there (its kernels do not use these threads)."""
    if requested is not None and requested < 1:
        raise ConfigError(f"--threads {requested}: must be at least 1")
    if torch.cuda.is_available():
        return None
    n = requested or default_threads()
    torch.set_num_threads(n)
    return n


def cpu_bf16() -> bool:
    """Whether torch computes bf16 products on this CPU with bf16-capable instructions (oneDNN's check: AVX-512 or
    AMX on x86, bf16 extensions on Arm). Without them every bf16 product is emulated: on an AVX2-only AMD EPYC the
    tiny preset's step took 35x as long in bf16 as in fp32 (docs/performance.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN has no fast bf16 products either
        return False
