"""The one interface between the trainer and a generative model (projector h_omega + denoiser g_phi).

A head reconstructs the latent-space encoding of an image (``target``) from the vision encoder's condition tokens.
The trainer knows nothing else about it, so continuous, discrete or any future kind plug in the same way:

* ``latent_kind``: which latent spaces it pairs with ("continuous": float latents; "discrete": code indices).
* ``draw(n, target_shape, generator)``: all randomness of the objective for ``n`` samples (noise, timesteps,
  masks), as a dict of tensors with leading dim ``n``. The trainer draws for the *global* micro-batch from a
  generator seeded by (seed, step), and each process takes its slice: runs are reproducible, resumable and
  identical for any number of processes.
* ``loss(target, cond, draws)``: per-sample loss ``(B,)``.
* ``sample(cond, target_shape, generator, steps)``: a reconstruction of the target from the condition alone.

A head keeps its network in ``self.denoiser`` (what ``train.compile`` compiles) beside its projector(s).

Condition tokens ``cond: (B, L, D)`` come from the backbone adapter; ``cond[:, 0]`` is the global token
(projected [CLS] for CLIP, ``pooler_output`` for SigLIP) and ``cond[:, 1:]`` optional local tokens.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class GenerativeHead(nn.Module):
    """Base class of projector + denoiser pairs driven by the trainer."""

    latent_kind: ClassVar[str] = "continuous"

    def draw(self, n: int, target_shape: tuple[int, ...], generator: torch.Generator,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Randomness of the objective for n samples with per-sample target shape ``target_shape``."""
        raise NotImplementedError

    def loss(self, target: torch.Tensor, cond: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """target: (B, *target_shape); cond: (B, L, D); draws: from ``draw`` -> per-sample loss (B,)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, target_shape: tuple[int, ...], generator: torch.Generator,
               steps: int = 25) -> torch.Tensor:
        """cond: (B, L, D) -> a target (B, *target_shape) generated from the condition alone."""
        raise NotImplementedError
