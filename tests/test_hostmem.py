"""Freed host memory is kept for reuse (glibc), measured by the page faults a repeated large allocation costs."""

import os
import platform
import subprocess
import sys

import pytest

from genhancer import hostmem

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's thresholds are glibc's")

# A 64 MiB block allocated, written and freed three times; prints whether the setting applied and the minor page
# faults of the last round: 16384 pages of 4 KiB when every round gets fresh pages from the kernel.
PROBE = """
import resource, sys
from genhancer.hostmem import keep_freed_memory
applied = keep_freed_memory()
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray(64 * 2**20)  # zero-filled: every page written
    del block
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, faults)
"""


def probe(setting: str) -> tuple[bool, int]:
    env = {**os.environ, hostmem.ENV: setting}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True).stdout
    applied, faults = out.split()
    return applied == "True", int(faults)


@glibc
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    applied, faults = probe("1")
    assert applied and faults < 1000  # the block comes back from the heap: its pages are already there
    applied, faults = probe("0")  # the opt-out: glibc's defaults, an mmap of fresh pages every round
    assert not applied and faults > 10_000


@glibc
def test_the_cli_applies_it_without_a_gpu(monkeypatch, capsys):
    import torch

    from genhancer.cli import main

    monkeypatch.setattr(hostmem, "kept", False)  # as if no earlier test had run the CLI in this process
    assert main(["info"]) == 0
    assert hostmem.kept == (not torch.cuda.is_available())  # with a GPU, glibc's defaults stay
