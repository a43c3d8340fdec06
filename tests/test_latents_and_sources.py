"""Latent spaces (pixel, AutoencoderKL) and loading backbones from the Hugging Face cache offline."""

import shutil

import pytest
import torch
from diffusers import AutoencoderKL

from genhancer.backbones import build_backbone
from genhancer.cli import main
from genhancer.config import ConfigError, ModelConfig
from genhancer.latents import AutoencoderSpace, PixelSpace, build_latent_space, shipped_config

TINY_VAE = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, layers_per_block=1,
                norm_num_groups=4, scaling_factor=0.5, shift_factor=0.25)


def test_pixel_space_pools_and_upsamples():
    space = PixelSpace(2)
    x = torch.rand(1, 3, 4, 4) * 2 - 1
    z = space.encode(x)
    torch.testing.assert_close(z[0, :, 0, 0], x[0, :, :2, :2].mean((1, 2)))
    assert space.decode(z).shape == x.shape and space.target_shape(32) == (3, 16, 16)


def test_autoencoder_space_applies_shift_and_scale(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE)
    vae.save_pretrained(tmp_path / "vae")
    space = build_latent_space(ModelConfig(latent="autoencoder", latent_path=str(tmp_path / "vae")))
    assert isinstance(space, AutoencoderSpace) and space.downsample == 2 and space.target_shape(32) == (4, 16, 16)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    z = space.encode(x)
    torch.testing.assert_close(z, (mean - 0.25) * 0.5)
    with torch.no_grad():
        torch.testing.assert_close(space.decode(z), vae.decode(mean).sample)
    assert not any(p.requires_grad for p in space.parameters())


def test_flux_vae_config_is_shipped_and_needs_weights():
    cfg = shipped_config("autoencoders", "flux-vae")
    assert cfg["latent_channels"] == 16 and cfg["scaling_factor"] == 0.3611 and cfg["shift_factor"] == 0.1159
    with pytest.raises(ConfigError, match="model.latent_path"):
        build_latent_space(ModelConfig(latent="flux-vae"))
    with pytest.raises(ConfigError, match="unknown latent space"):
        build_latent_space(ModelConfig(latent="jpeg"))


def test_autoencoder_latent_trains_end_to_end(tiny_clip, overrides, tmp_path):
    AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "vae")
    run = tmp_path / "run"
    assert main(["train", *overrides(tiny_clip, run, steps=2, model__latent="autoencoder",
                                     model__latent_path=tmp_path / "vae", model__denoiser_arch="{patch_size: 2}")]) == 0
    assert (run / "checkpoints" / "step-0000002").is_dir()


def test_backbone_and_export_from_the_hugging_face_cache(tiny_clip, overrides, tmp_path, monkeypatch):
    """A hub id already in the local cache loads offline, and its processor files reach the export."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-clip" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_clip, snapshot)
    (cache / "models--acme--tiny-clip" / "refs").mkdir()
    (cache / "models--acme--tiny-clip" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    backbone = build_backbone(ModelConfig(backbone="acme/tiny-clip"))
    assert backbone.image_size == 32
    s1, s2, out = tmp_path / "s1", tmp_path / "s2", tmp_path / "out"
    assert main(["train", *overrides("acme/tiny-clip", s1, steps=1)]) == 0
    assert main(["train", *overrides("acme/tiny-clip", s2, stage="stage2", steps=1, stage__init_from=s1)]) == 0
    assert main(["export", str(s2), str(out)]) == 0
    assert (out / "preprocessor_config.json").is_file() and (out / "tokenizer_config.json").is_file()
