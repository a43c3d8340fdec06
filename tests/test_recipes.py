"""Every shipped recipe parses, validates and carries the paper's hyper-parameters."""

import pytest

from genhancer.backbones import BACKBONES
from genhancer.recipes import recipe_names, recipe_path
from genhancer.config import load_config

FILL = ["data.path=/data/cc3m/{00000..00001}.tar", "model.latent_path=/models/vae"]


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_loads(name):
    cfg = load_config(recipe_path(name), FILL)
    assert cfg.model.backbone in BACKBONES
    assert cfg.train.batch_size * cfg.train.grad_accum * 8 == 256  # global batch on 8 GPUs
    assert cfg.lr == (1e-4 if cfg.stage.stage == "stage1" else 1e-5)
    if cfg.stage.stage == "stage2":
        assert cfg.stage.init_from and (cfg.stage.lora_r, cfg.stage.lora_alpha) == (16, 16)


def test_continuous_recipes_cover_the_six_backbones_and_both_stages():
    names = set(recipe_names())
    assert {f"{b}-{s}" for b in BACKBONES for s in ("stage1", "stage2")} <= names
    assert {f"discrete/{b}-{s}" for b in ("openai-clip-vit-l-14-224", "siglip-so400m-14-224", "siglip-so400m-14-384")
            for s in ("stage1", "stage2")} <= names
