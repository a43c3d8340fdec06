"""The projector h_omega: maps the vision encoder's condition tokens into a denoiser's conditioning widths."""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, from the encoder's token width to one conditioning width."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_dim) -> (..., out_dim)."""
        return self.net(x)
