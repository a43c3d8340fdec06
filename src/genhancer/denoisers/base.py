"""What a denoiser family module provides, and the one helper its networks share.

A family (``flux.py``, ``perceiver.py``) holds pure networks: no random draws, no loss, no sampler (those belong
to ``genhancer.objectives``) and no config errors (bad shapes raise ``ValueError``; ``genhancer.enhancer`` turns
them into the user's ``ConfigError``). It exposes:

* ``ARCH``: the frozen architecture dataclass its presets (``configs/denoisers/<name>.json``) are loaded into;
* ``LATENT_KIND``: the latent spaces it pairs with ("continuous" / "discrete"), hence its objective;
* ``build(arch, cond_dim, latent)``: its head for condition tokens of width ``cond_dim`` over ``latent``. The head
  is the module saved under ``head.`` in checkpoints: the projector(s) h_omega and the network g_phi, kept in
  ``head.denoiser`` (what ``train.compile`` compiles, with a ``grad_checkpointing`` switch). Its ``forward`` is
  what the objective calls, and ``check_target(target_shape)`` raises ``ValueError`` on a latent the network
  cannot take.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_block(block: nn.Module, recompute: bool, *args):
    """``block(*args)``, recomputed in backward (activation checkpointing) when ``recompute`` and training."""
    if recompute and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
