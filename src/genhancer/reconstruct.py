"""Reconstruction previews: what the denoiser makes of an image from the encoder's global token alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_checkpoint, load_run_config, resolve_checkpoint
from .enhancer import Enhancer, apply_stage, build_enhancer


def load_enhancer(run: str | Path, device: str = "cpu") -> Enhancer:
    """The run's whole model (encoder as trained, head, latent space) from its newest good checkpoint."""
    ckpt = resolve_checkpoint(run)
    cfg = load_run_config(ckpt)
    enh = build_enhancer(cfg)
    apply_stage(enh, cfg.stage)
    weights, _, _ = load_checkpoint(ckpt)
    enh.load_saved_weights(weights)
    return enh.to(device).eval()


@torch.no_grad()
def reconstruct(enh: Enhancer, images: torch.Tensor, seed: int = 0, steps: int = 25) -> torch.Tensor:
    """images: (B, 3, S, S) in [0, 1] -> reconstructions (B, 3, S', S') in [0, 1] (S' = the latent's decode size)."""
    images = images.to(next(enh.parameters()).device)
    cond = enh.condition({"pixels": images}, None)
    gen = torch.Generator().manual_seed(seed)
    target = enh.sample(cond, gen, steps=steps)
    return (enh.latent.decode(target).clamp(-1, 1) + 1) / 2


def save_grid(rows: list[torch.Tensor], path: str | Path, pad: int = 2) -> Path:
    """Write columns of images side by side: rows[k]: (B, 3, H, W) in [0, 1], one column per list entry."""
    size = max(r.shape[-1] for r in rows)
    cols = [torch.nn.functional.interpolate(r.float().cpu(), size=(size, size), mode="nearest") for r in rows]
    b = cols[0].shape[0]
    grid = torch.ones(3, b * (size + pad) + pad, len(cols) * (size + pad) + pad)
    for i in range(b):
        for j, col in enumerate(cols):
            y, x = pad + i * (size + pad), pad + j * (size + pad)
            grid[:, y:y + size, x:x + size] = col[i]
    array = (grid.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return Path(path)

