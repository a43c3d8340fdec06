"""Shared fixtures: tiny CLIP / SigLIP folders (save_pretrained with processor + tokenizer) and tiny run configs."""

from __future__ import annotations

import os

import pytest
import torch

from eval_fixtures import save_tiny_clip, save_tiny_siglip

torch.set_num_threads(1)  # tiny models gain nothing from threads, and oversubscribed cores lose a lot
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the count `genhancer train` sets (genhancer.threads) in tests


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0, image_size=32)


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory):
    return save_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip"), seed=0, image_size=32)


def tiny_overrides(backbone, out, stage="stage1", steps=4, **extra) -> list[str]:
    """``key=value`` overrides of a tiny CPU run: pixel latent at half resolution, flux-tiny, synthetic data."""
    base = {
        "model.backbone": str(backbone), "model.latent": "pixel", "model.latent_downsample": 2,
        "model.denoiser": "flux-tiny", "data.source": "synthetic", "data.synthetic_size": 64,
        "data.num_workers": 0, "train.batch_size": 4, "train.grad_accum": 1, "train.max_steps": steps,
        "train.precision": "fp32", "train.trackers": "[]", "train.log_every": 1, "train.save_every": 2,
        "train.output_dir": str(out), "stage.stage": stage, "optim.warmup_steps": 0,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def overrides():
    return tiny_overrides


@pytest.fixture
def build_devices(monkeypatch):
    """The ``device`` of every ``build_enhancer`` call made from here on (as strings; "None": drawn on the CPU)."""
    import genhancer.enhancer
    import genhancer.trainer

    build, devices = genhancer.enhancer.build_enhancer, []

    def spy(cfg, device=None):
        devices.append(str(device))
        return build(cfg, device)

    monkeypatch.setattr(genhancer.trainer, "build_enhancer", spy)
    monkeypatch.setattr(genhancer.enhancer, "build_enhancer", spy)  # imported where used by the cache and the bench
    return devices
