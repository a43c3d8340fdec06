"""The discrete path through the real entry point: tiny VQ -> stage 1 -> stage 2 -> export, preview and info."""

import json

import pytest
import torch
from PIL import Image

from genhancer.cli import main


@pytest.fixture(scope="module")
def tiny_vq(tmp_path_factory):
    from diffusers import VQModel

    from genhancer.vq import vq_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-vq")
    VQModel.from_config(vq_config("tiny")).save_pretrained(path)
    return path


def discrete(overrides, backbone, out, vq, **extra):
    return overrides(backbone, out, model__latent="vq", model__latent_path=vq, model__denoiser="perceiver-tiny",
                     **extra)


def test_discrete_stages_export_and_preview(tiny_clip, overrides, tiny_vq, tmp_path):
    s1, s2, out = tmp_path / "s1", tmp_path / "s2", tmp_path / "export"
    assert main(["train", *discrete(overrides, tiny_clip, s1, tiny_vq, steps=8, optim__lr=3e-3)]) == 0
    curve = [json.loads(line)["loss"] for line in (s1 / "metrics.jsonl").read_text().splitlines()]
    assert abs(curve[0] - torch.log(torch.tensor(256.0)).item()) < 1e-3  # zero-init logits: uniform over codes
    assert sum(curve[-2:]) / 2 < curve[0]
    assert main(["train", *discrete(overrides, tiny_clip, s2, tiny_vq, stage="stage2", steps=2,
                                    stage__init_from=s1, objective__mask_ratio=0.75)]) == 0
    assert main(["export", str(s2), str(out)]) == 0
    assert (out / "config.json").is_file()

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 36), (90 * i, 30, 200)).save(images / f"{i}.png")
    grid = tmp_path / "grid.png"
    assert main(["reconstruct", str(s1), "--images", str(images), "--out", str(grid), "-n", "2", "--steps", "3"]) == 0
    assert Image.open(grid).size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)


def test_discrete_head_needs_a_discrete_latent(tiny_clip, overrides, tmp_path):
    from genhancer.config import ConfigError, load_config
    from genhancer.enhancer import build_enhancer

    with pytest.raises(ConfigError, match="use a VQ latent"):
        build_enhancer(load_config(None, overrides(tiny_clip, tmp_path, model__denoiser="perceiver-tiny")))


def test_info_counts_the_perceiver_presets():
    from genhancer.info import describe

    text = describe(backbones=[], denoisers=["perceiver-l2", "perceiver-l4", "perceiver-l6", "perceiver-l8"])
    assert all(f"perceiver-l{n}" in text for n in (2, 4, 6, 8))


def test_objective_settings_reach_the_head(tiny_clip, overrides, tiny_vq, tmp_path):
    from genhancer.config import load_config
    from genhancer.enhancer import build_enhancer

    cfg = load_config(None, discrete(overrides, tiny_clip, tmp_path, tiny_vq, objective__mask_ratio_min=0.6,
                                     objective__mask_ratio_max=0.8, train__grad_checkpointing="true"))
    enh = build_enhancer(cfg)
    o = enh.objective.cfg
    assert (o.mask_ratio_min, o.mask_ratio_max, o.mask_ratio) == (0.6, 0.8, None)
    assert enh.head.denoiser.grad_checkpointing and enh.target_shape == (8, 8)
    ratios = enh.draw(64, torch.Generator().manual_seed(0))["mask"].float().mean((1, 2))
    assert ratios.min() >= 0.59 and ratios.max() <= 0.81


def test_network_shape_errors_reach_the_user_as_config_errors(tiny_clip, overrides, tiny_vq, tmp_path):
    from genhancer.config import ConfigError, load_config
    from genhancer.enhancer import build_enhancer

    with pytest.raises(ConfigError, match="max_grid=8"):  # the tiny VQ's 8 x 8 grid in a 4 x 4 position table
        build_enhancer(load_config(None, discrete(overrides, tiny_clip, tmp_path, tiny_vq,
                                                  model__denoiser_arch="{max_grid: 4}")))
    enh = build_enhancer(load_config(None, discrete(overrides, tiny_clip, tmp_path, tiny_vq)))
    other = build_enhancer(load_config(None, discrete(overrides, tiny_clip, tmp_path, tiny_vq,
                                                      model__denoiser_arch="{max_grid: 12}")))
    with pytest.raises(ConfigError, match="max_grid=12"):  # a checkpoint of another position table
        enh.load_saved_weights(other.weights_to_save(), head_only=True)
