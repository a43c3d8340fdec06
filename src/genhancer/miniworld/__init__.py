"""The offline miniature world: scene generator, tiny base CLIP, benchmarks, probes, incentive measurement, demo
and ablations."""

from __future__ import annotations


def pin_threads(threads: int) -> None:
    """Run torch on ``threads`` CPU threads. The world's numbers depend on the thread count (float sums are split
    differently), and on a busy 2-core machine torch's default was measured 9x slower than one thread."""
    import torch

    torch.set_num_threads(threads)
