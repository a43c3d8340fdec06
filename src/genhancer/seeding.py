"""The one seed derivation of the library: every random stream is named by a tuple of parts.

``derive_seed(seed, step, micro)`` gives the objective draws of a training micro-step, ``derive_seed(seed, epoch)``
a data order, ``derive_seed(seed, epoch, index)`` a crop, and so on. The hash (BLAKE2b of the tuple's ``repr``) is
stable across processes, machines and Python versions (``hash()`` is salted for strings), so every process of a
run derives the same streams and a resumed run continues them exactly.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed (a valid ``torch.manual_seed`` argument) from a tuple of ints and strings."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))
