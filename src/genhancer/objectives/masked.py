"""Masked VQ-token prediction over discrete latents (Sec. 4.4, Algorithm 2, Eq. 4 of the paper).

Mask a share r of the image's code grid; the head predicts the code of every position from the unmasked codes
and the condition, trained by cross-entropy on masked positions only. Choices where the paper is silent, taken
from masked-token models (MaskGIT, MAGE):

* Masking: per-sample ratio ~ U[mask_ratio_min, mask_ratio_max] (paper: 50-90 %, following MAGE), or a fixed
  ``mask_ratio`` (Table 8); ``round(r * N)`` positions chosen uniformly at random, at least one.
* Reconstruction preview: MaskGIT's iterative parallel decoding (cosine schedule, Gumbel-perturbed confidence
  re-masking with a temperature annealed to 0).

A new mask-ratio rule is one function ``(n, generator, cfg) -> r (n,)`` in ``MASK_RATIOS``, selected by
``objective.mask_sampling``; a fixed ``objective.mask_ratio`` overrides every rule.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from .base import Objective

if TYPE_CHECKING:
    from ..config import ObjectiveConfig


def uniform_ratio(n: int, generator: torch.Generator, cfg: ObjectiveConfig) -> torch.Tensor:
    """r ~ U[mask_ratio_min, mask_ratio_max] (MAGE; the paper's 50-90 %)."""
    u = torch.rand(n, generator=generator, device=generator.device).cpu()
    return cfg.mask_ratio_min + (cfg.mask_ratio_max - cfg.mask_ratio_min) * u


MASK_RATIOS: dict[str, Callable[[int, torch.Generator, "ObjectiveConfig"], torch.Tensor]] = {
    "uniform": uniform_ratio,
}


def mask_ratios(n: int, generator: torch.Generator, cfg: ObjectiveConfig) -> torch.Tensor:
    """(n,) per-sample mask ratios: the fixed ``mask_ratio`` (Table 8), or the ``mask_sampling`` rule's."""
    if cfg.mask_ratio is not None:
        return torch.full((n,), cfg.mask_ratio)
    return MASK_RATIOS[cfg.mask_sampling](n, generator, cfg)


class MaskedTokens(Objective):
    """Mask draws, the masked cross-entropy and MaskGIT decoding of a head predicting codebook logits."""

    latent_kind = "discrete"

    def draw(self, n, target_shape, generator, device="cpu"):
        """target_shape: (h, w) -> {"mask": (n, h, w) bool, True = masked}."""
        h, w = target_shape
        N = h * w
        n_masked = (mask_ratios(n, generator, self.cfg) * N).round().clamp(1, N).long()  # (n,)
        scores = torch.rand(n, N, generator=generator, device=generator.device).cpu()
        rank = scores.argsort(dim=1).argsort(dim=1)  # uniform random permutation rank of each position
        mask = rank < n_masked[:, None]
        return {"mask": mask.view(n, h, w).to(device)}

    def loss(self, head, target, cond, draws):
        """target: (B, h, w) code indices; cond: (B, L_c, D_c) -> (B,) mean cross-entropy over masked positions."""
        # Indices may arrive as floats from a float32 target cache; exact there, but anything fractional is a
        # continuous latent.
        if target.dim() != 3 or (target.is_floating_point() and not torch.equal(target, target.round())):
            raise ValueError(f"masked-token prediction needs VQ code indices (B, h, w), got {tuple(target.shape)} "
                             f"{target.dtype}: use a discrete latent space (model.latent=vq)")
        target, mask = target.long(), draws["mask"]
        logits = head(target, mask, cond).float()  # (B, h, w, K)
        ce = F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none").view_as(mask)
        m = mask.float()
        return (ce * m).sum(dim=(1, 2)) / m.sum(dim=(1, 2))

    @torch.no_grad()
    def sample(self, head, cond, target_shape, generator, steps=25):
        """MaskGIT decoding. cond: (B, L_c, D_c) -> code indices (B, h, w).

        Start fully masked; each step samples every masked position, keeps the most confident samples and re-masks
        the rest so that cos(pi/2 * (t+1)/steps) of the grid stays masked. Confidence is the sampled token's log-
        probability plus Gumbel noise scaled by a temperature annealed to 0, as in MaskGIT.
        """
        B, (h, w) = cond.shape[0], target_shape
        N, dev = h * w, cond.device
        tokens = torch.zeros(B, h, w, dtype=torch.long, device=dev)
        masked = torch.ones(B, h, w, dtype=torch.bool, device=dev)

        def gumbel(shape):
            u = torch.rand(shape, generator=generator, device=generator.device).to(dev)
            return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))

        for t in range(steps):
            logits = head(tokens, masked, cond).float()  # (B, h, w, K)
            sampled = (logits + gumbel(logits.shape)).argmax(-1)  # Gumbel-max = a draw from softmax(logits)
            tokens = torch.where(masked, sampled, tokens)
            ratio = (t + 1) / steps
            n_next = math.floor(N * math.cos(math.pi / 2 * ratio))
            if n_next == 0:
                masked = torch.zeros_like(masked)
                continue
            logp = logits.log_softmax(-1).gather(-1, sampled[..., None])[..., 0]
            confidence = logp + self.cfg.choice_temperature * (1 - ratio) * gumbel(logp.shape)
            confidence = confidence.masked_fill(~masked, math.inf).view(B, N)  # decided tokens stay decided
            # Re-mask the n_next least confident, at least one fewer than are masked now so every step decides one.
            n_next = min(n_next, int(masked.view(B, N).sum(1).min()) - 1)
            lowest = confidence.argsort(dim=1)[:, :max(n_next, 0)]
            masked = torch.zeros(B, N, dtype=torch.bool, device=dev).scatter_(1, lowest, True).view(B, h, w)
        return tokens
