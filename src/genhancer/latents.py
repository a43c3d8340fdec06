"""Latent spaces: frozen encoders that turn an image into the target a head reconstructs, and back.

Images enter in [-1, 1] (``(x - 0.5) / 0.5`` of the crop). Continuous spaces (pixels, a diffusers
``AutoencoderKL``) return float latents ``(B, C, h, w)``; the discrete one (a diffusers ``VQModel``, trained or
converted by ``vq.py``) returns code indices ``(B, h, w)``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import ConfigError


class LatentSpace(nn.Module):
    """A frozen image <-> target mapping."""

    kind: ClassVar[str] = "continuous"
    downsample: int = 1  # image side / latent side

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> target."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """target -> (B, 3, H, W) in [-1, 1]."""
        raise NotImplementedError

    def target_shape(self, image_size: int) -> tuple[int, ...]:
        """Per-sample shape of the target of a square image of side ``image_size``."""
        raise NotImplementedError

    def check_image_size(self, image_size: int) -> None:
        if image_size % self.downsample:
            raise ConfigError(
                f"image size {image_size} is not divisible by the latent space's downsampling factor "
                f"{self.downsample}: pick a backbone resolution or latent that divide evenly")


class PixelSpace(LatentSpace):
    """Identity (optionally average-pooled) pixels: the latent space of tiny runs and tests."""

    def __init__(self, downsample: int = 1):
        super().__init__()
        self.downsample = downsample
        self.channels = 3

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.downsample) if self.downsample > 1 else x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z, scale_factor=self.downsample, mode="nearest") if self.downsample > 1 else z

    def target_shape(self, image_size: int) -> tuple[int, ...]:
        s = image_size // self.downsample
        return (3, s, s)


class AutoencoderSpace(LatentSpace):
    """A frozen diffusers ``AutoencoderKL``; latents are ``(mean - shift) * scale`` of the posterior."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.scale = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # The posterior mean, not a sample: deterministic, hence cacheable; FLUX's posterior std is negligible.
        mean = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean
        return ((mean - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((z / self.scale + self.shift).to(self.vae.dtype)).sample.float()

    def target_shape(self, image_size: int) -> tuple[int, ...]:
        s = image_size // self.downsample
        return (self.channels, s, s)


def shipped_config(kind: str, name: str) -> dict:
    """A JSON architecture config shipped in ``genhancer/configs/<kind>/<name>.json``."""
    text = resources.files("genhancer").joinpath("configs", kind, f"{name}.json").read_text()
    return json.loads(text)


def _autoencoder(cfg: ModelConfig, config_name: str | None) -> LatentSpace:
    from diffusers import AutoencoderKL

    if cfg.random_init and config_name:
        return AutoencoderSpace(AutoencoderKL.from_config(shipped_config("autoencoders", config_name)))
    path = cfg.latent_path
    if not path:
        raise ConfigError(f"model.latent={cfg.latent} needs its weights: set model.latent_path=DIR "
                          "(a diffusers AutoencoderKL folder, e.g. FLUX.1-dev's vae/ subfolder)")
    return AutoencoderSpace(_load_diffusers(AutoencoderKL, path, "model.latent_path"))


def _load_diffusers(cls, path: str, key: str) -> nn.Module:
    p = Path(path)
    try:
        if p.exists():
            sub = p / "vae" if (p / "vae" / "config.json").is_file() and not (p / "config.json").is_file() else p
            return cls.from_pretrained(str(sub))
        return cls.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}='{path}' could not be loaded offline ({str(e).splitlines()[0][:120]}): "
                          f"point {key} at a local {cls.__name__} folder") from None


class VQSpace(LatentSpace):
    """A frozen diffusers ``VQModel``; the target is the grid of nearest-codebook indices."""

    kind = "discrete"

    def __init__(self, vq):
        super().__init__()
        self.vq = vq.eval().requires_grad_(False)
        cfg = vq.config
        self.codebook_size = int(cfg.num_vq_embeddings)
        self.embed_dim = int(cfg.vq_embed_dim or cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, path: str) -> "VQSpace":
        from diffusers import VQModel

        return cls(_load_diffusers(VQModel, path, "model.latent_path"))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> (B, H / f, W / f) long code indices."""
        z = self.vq.encode(x.to(self.vq.dtype)).latents.float()  # (B, C, h, w) before quantization
        B, C, h, w = z.shape
        codebook = self.vq.quantize.embedding.weight.float()  # (K, C)
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)
        return torch.cdist(flat, codebook).argmin(dim=1).view(B, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (B, h, w) long -> (B, 3, h * f, w * f) in [-1, 1]."""
        B, h, w = codes.shape
        z = self.vq.quantize.get_codebook_entry(codes.reshape(-1), (B, h, w, self.embed_dim))
        return self.vq.decode(z.to(self.vq.dtype), force_not_quantize=True).sample.float().clamp(-1, 1)

    def target_shape(self, image_size: int) -> tuple[int, ...]:
        self.check_image_size(image_size)
        s = image_size // self.downsample
        return (s, s)


def load_vq_space(cfg: ModelConfig) -> VQSpace:
    """``model.latent=vq``: the VQ model in ``model.latent_path``; a random tiny one for ``model.random_init``."""
    from diffusers import VQModel

    if cfg.latent_path:
        return VQSpace.from_pretrained(cfg.latent_path)
    if cfg.random_init:
        return VQSpace(VQModel.from_config(shipped_config("vq", "tiny")))
    raise ConfigError("model.latent=vq needs a VQ model: set model.latent_path=DIR (a folder written by "
                      "`genhancer train-vq` or `genhancer convert-vqgan`)")


LATENT_SPACES: dict[str, Callable[[ModelConfig], LatentSpace]] = {
    "pixel": lambda cfg: PixelSpace(cfg.latent_downsample),
    "flux-vae": lambda cfg: _autoencoder(cfg, "flux-vae"),
    "autoencoder": lambda cfg: _autoencoder(cfg, None),
    "vq": load_vq_space,
}


def build_latent_space(cfg: ModelConfig) -> LatentSpace:
    """The frozen latent space named by ``cfg.latent``."""
    if cfg.latent not in LATENT_SPACES:
        raise ConfigError(f"unknown latent space '{cfg.latent}': choose one of {', '.join(sorted(LATENT_SPACES))}")
    return LATENT_SPACES[cfg.latent](cfg).eval().requires_grad_(False)
