"""Architectures and parameter counts of the registered presets, built on the meta device (no weights)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .backbones import BACKBONES, build_from_config
from .denoisers import DENOISERS
from .enhancer import build_head


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def backbone_row(name: str) -> dict:
    preset = BACKBONES[name]
    with torch.device("meta"):
        model = build_from_config(preset.config)
    v = preset.config["vision_config"]
    cond_dim = preset.config.get("projection_dim") if preset.family == "clip" else v["hidden_size"]
    return {"name": name, "family": preset.family, "resolution": v["image_size"], "patch": v["patch_size"],
            "params": count(model), "vision_params": count(model.vision_model), "cond_dim": cond_dim,
            "hub_id": preset.hub_id}


def denoiser_row(name: str, cond_dim: int = 768) -> dict:
    """The preset's head alone (no backbone or latent space to build): over a stand-in for FLUX's 16-channel VAE
    or a 1024-code VQ-GAN, whichever kind of latent it takes."""
    preset = DENOISERS[name]
    latent = SimpleNamespace(kind=preset.module.LATENT_KIND, channels=16, codebook_size=1024)
    with torch.device("meta"):
        head = build_head(name, None, cond_dim, latent)
    return {"name": name, "family": preset.family, "denoiser_params": count(head.denoiser),
            "head_params": count(head), "arch": preset.arch}


def describe(backbones: list[str] | None = None, denoisers: list[str] | None = None) -> str:
    lines = ["Backbones (whole model, built from the shipped config):",
             f"  {'name':28} {'family':7} {'res':>4} {'params':>13} {'vision':>13} {'cond':>5}  weights"]
    for name in backbones or BACKBONES:
        r = backbone_row(name)
        lines.append(f"  {r['name']:28} {r['family']:7} {r['resolution']:>4} {r['params']:>13,} "
                     f"{r['vision_params']:>13,} {r['cond_dim']:>5}  {r['hub_id']}")
    lines += ["", "Denoisers (denoiser alone; with projectors for a 768-wide condition token):",
              f"  {'name':16} {'family':10} {'denoiser':>15} {'with projector':>15}"]
    for name in denoisers or DENOISERS:
        r = denoiser_row(name)
        lines.append(f"  {r['name']:16} {r['family']:10} {r['denoiser_params']:>15,} {r['head_params']:>15,}")
    return "\n".join(lines)
