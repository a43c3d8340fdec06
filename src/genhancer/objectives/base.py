"""The one interface between the task (``genhancer.enhancer.Enhancer``) and a training objective.

An objective says how a head (projector(s) + network, ``genhancer.denoisers``) learns to reconstruct the
latent-space encoding of an image (``target``) from the vision encoder's condition tokens, and how it samples.
It reads its settings from ``ObjectiveConfig`` and has no parameters, so checkpoints hold the head alone.

* ``latent_kind``: the latent spaces it works on ("continuous": float latents; "discrete": code indices).
* ``draw(n, target_shape, generator)``: all randomness of the objective for ``n`` samples (noise, timesteps,
  masks), as a dict of tensors with leading dim ``n``. The trainer draws for the *global* micro-batch from a
  generator seeded by (seed, step), and each process takes its slice: runs are reproducible, resumable and
  identical for any number of processes.
* ``loss(head, target, cond, draws)``: per-sample loss ``(B,)``.
* ``sample(head, cond, target_shape, generator, steps)``: a reconstruction of the target from the condition alone.

Condition tokens ``cond: (B, L, D)`` come from the backbone adapter; ``cond[:, 0]`` is the global token
(projected [CLS] for CLIP, ``pooler_output`` for SigLIP) and ``cond[:, 1:]`` optional local tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from ..config import ObjectiveConfig


class Objective:
    """Draws, corruption, per-sample loss and sampler of one kind of latent; settings from ``ObjectiveConfig``."""

    latent_kind: ClassVar[str]

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    def draw(self, n: int, target_shape: tuple[int, ...], generator: torch.Generator,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Randomness of the objective for n samples with per-sample target shape ``target_shape``."""
        raise NotImplementedError

    def loss(self, head: nn.Module, target: torch.Tensor, cond: torch.Tensor,
             draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """target: (B, *target_shape); cond: (B, L, D); draws: from ``draw`` -> per-sample loss (B,)."""
        raise NotImplementedError

    def sample(self, head: nn.Module, cond: torch.Tensor, target_shape: tuple[int, ...],
               generator: torch.Generator, steps: int = 25) -> torch.Tensor:
        """cond: (B, L, D) -> a target (B, *target_shape) generated from the condition alone."""
        raise NotImplementedError
