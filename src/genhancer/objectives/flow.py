"""Rectified flow over continuous latents (Eq. 6 of the paper; the authors' release and FLUX).

Time convention: ``x_t = (1 - t) x + t eps`` with t = 1 pure noise; the network predicts the velocity ``eps - x``;
sampling integrates the ODE from t = 1 down to t = 0 with Euler steps. Latents ``(B, C, H, W)`` reach the network
as patch tokens ``(B, H/p * W/p, C p^2)`` with RoPE position ids (0, row, column); condition tokens get ids 0.

A new timestep distribution is one function ``(n, generator, cfg) -> t (n,)`` in ``TIMESTEP_SCHEDULES``, selected
by ``objective.timestep_sampling``; ``objective.uniform_share`` replaces that share of its draws by U[0, 1] draws, so
that a concentrated schedule still trains the head at every t its sampler visits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from einops import rearrange
from torch import nn

from .base import Objective

if TYPE_CHECKING:
    from ..config import ObjectiveConfig


def logit_normal(n: int, generator: torch.Generator, cfg: ObjectiveConfig) -> torch.Tensor:
    """t = sigmoid(m + s * eps), eps ~ N(0, 1) (Eq. 6); m > 0 samples nearer t = 1 (pure noise)."""
    eps = torch.randn(n, generator=generator)
    return torch.sigmoid(cfg.logit_normal_mean + cfg.logit_normal_scale * eps)


def uniform(n: int, generator: torch.Generator, cfg: ObjectiveConfig) -> torch.Tensor:
    """t ~ U[0, 1]."""
    return torch.rand(n, generator=generator)


TIMESTEP_SCHEDULES: dict[str, Callable[[int, torch.Generator, "ObjectiveConfig"], torch.Tensor]] = {
    "logit-normal": logit_normal,
    "uniform": uniform,
}


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """x: (B, C, H, W) -> patch tokens (B, H/p * W/p, C p^2)."""
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=p, pw=p)


def unpatchify(tokens: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """tokens: (B, h * w, C p^2) over an h x w patch grid -> (B, C, h p, w p)."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=p, pw=p)


def image_ids(h: int, w: int, device: torch.device) -> torch.Tensor:
    """RoPE position ids (0, row, column) of an h x w patch grid -> (h * w, 3), shared by the batch."""
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


class RectifiedFlow(Objective):
    """Noise and timestep draws, the velocity loss and the Euler sampler of a velocity-predicting head."""

    latent_kind = "continuous"

    def draw(self, n, target_shape, generator, device="cpu"):
        noise = torch.randn((n, *target_shape), generator=generator)
        t = TIMESTEP_SCHEDULES[self.cfg.timestep_sampling](n, generator, self.cfg)
        if self.cfg.uniform_share > 0:  # drawn only then: a run without a share keeps its random stream
            swap = torch.rand(n, generator=generator) < self.cfg.uniform_share
            t = torch.where(swap, torch.rand(n, generator=generator), t)
        return {"noise": noise.to(device), "t": t.to(device)}

    def velocity(self, head: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_t: (B, C, H, W), t: (B,), cond: (B, L, D) -> the head's velocity (B, C, H, W)."""
        p = head.patch_size
        b, _, h, w = x_t.shape
        img = patchify(x_t, p)  # (B, Li, C p^2)
        txt_ids = torch.zeros(cond.shape[1], 3, device=x_t.device)  # (L, 3)
        out = head(img, image_ids(h // p, w // p, x_t.device), cond, txt_ids, t)  # (B, Li, C p^2)
        return unpatchify(out, p, h // p, w // p)

    def loss(self, head, target, cond, draws):
        noise, t = draws["noise"].to(target.dtype), draws["t"].to(target.dtype)
        tb = t.view(-1, *([1] * (target.ndim - 1)))
        x_t = (1 - tb) * target + tb * noise
        pred = self.velocity(head, x_t, t, cond)
        return (pred.float() - (noise - target).float()).pow(2).flatten(1).mean(1)

    @torch.no_grad()
    def sample(self, head, cond, target_shape, generator, steps=25):
        x = torch.randn((cond.shape[0], *target_shape), generator=generator).to(cond.device, cond.dtype)
        ts = torch.linspace(1.0, 0.0, steps + 1, device=cond.device)
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            v = self.velocity(head, x, t_cur.expand(x.shape[0]).to(x.dtype), cond)
            x = x + (t_next - t_cur) * v
        return x
