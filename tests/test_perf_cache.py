"""The encoder cache: the trainer reads it with the same losses as from images, and refuses one of another run."""

import json

import pytest
import torch

from genhancer.bench import tiny_autoencoder
from genhancer.cache import build_cache, open_cache
from genhancer.config import ConfigError, load_config
from genhancer.enhancer import build_enhancer
from genhancer.trainer import train


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def run(overrides, backbone, out, **extra):
    cfg = load_config(None, overrides(backbone, out, **extra))
    torch.manual_seed(0)  # the head's initialisation
    return train(cfg), cfg


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return tiny_autoencoder(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.mark.parametrize("condition", ["cls", "cls+local"])
def test_stage1_from_cache_has_the_losses_of_the_images(tiny_clip, overrides, tmp_path, vae, condition):
    model = dict(model__latent="autoencoder", model__latent_path=vae, model__condition=condition,
                 model__local_ratio=0.5)
    images, cfg = run(overrides, tiny_clip, tmp_path / "images", steps=3, **model)
    build_cache(cfg, tmp_path / "cache", batch_size=5, shard_size=24, log=lambda *_: None)  # several shards
    cached, _ = run(overrides, tiny_clip, tmp_path / "cached", steps=3, data__source="cache",
                    data__path=tmp_path / "cache", **model)
    assert len(losses(images)) == 3
    assert losses(cached) == pytest.approx(losses(images), rel=1e-5)


def test_stage2_from_a_crops_cache_has_the_losses_of_the_images(tiny_clip, overrides, tmp_path, vae):
    model = dict(model__latent="autoencoder", model__latent_path=vae, stage__lora_dropout=0.0)
    s1, _ = run(overrides, tiny_clip, tmp_path / "s1", steps=1, **model)
    s2 = dict(stage="stage2", stage__init_from=s1, steps=2, **model)
    images, cfg = run(overrides, tiny_clip, tmp_path / "images", **s2)
    build_cache(cfg, tmp_path / "cache", log=lambda *_: None)
    cached, _ = run(overrides, tiny_clip, tmp_path / "cached", data__source="cache", data__path=tmp_path / "cache",
                    **s2)
    assert losses(cached) == pytest.approx(losses(images), rel=1e-5)


def test_k_views_are_the_crops_of_epochs_0_to_k_minus_1(tiny_clip, overrides, tmp_path):
    cfg = load_config(None, overrides(tiny_clip, tmp_path / "run", data__synthetic_size=8))
    build_cache(cfg, tmp_path / "cache", views=3, log=lambda *_: None)
    ds = open_cache(load_config(None, overrides(tiny_clip, tmp_path / "run", data__source="cache",
                                                data__path=tmp_path / "cache")), build_enhancer(cfg))
    assert len(ds) == 24 and ds.manifest["views"] == 3
    targets = torch.stack([ds[i]["target"] for i in range(24)]).view(3, 8, -1)
    assert not torch.allclose(targets[0], targets[1])  # another crop per view


@pytest.fixture
def stage1_cache(tiny_clip, overrides, tmp_path):
    cfg = load_config(None, overrides(tiny_clip, tmp_path / "run"))
    return build_cache(cfg, tmp_path / "cache", log=lambda *_: None)


@pytest.mark.parametrize("change, says", [
    (dict(train__seed=1), "crop seed (train.seed): cache 0, run 1"),
    (dict(data__crop_scale="[0.5,1.0]"), "crop scale (data.crop_scale)"),
    (dict(model__latent_downsample=4), "latent target shape"),
    (dict(model__random_init=True), "backbone weights"),
    (dict(model__condition="cls+local"), "run needs local tokens"),
    (dict(stage="stage2"), "trains the encoder"),
])
def test_a_cache_of_another_run_is_refused_naming_what_differs(tiny_clip, overrides, tmp_path, stage1_cache,
                                                               change, says):
    cfg = load_config(None, overrides(tiny_clip, tmp_path / "other", data__source="cache", data__path=stage1_cache,
                                      **change))
    with pytest.raises(ConfigError, match="cache") as err:
        open_cache(cfg, build_enhancer(cfg))
    assert says in str(err.value)


def test_an_incomplete_cache_and_a_used_folder_are_refused(tiny_clip, overrides, tmp_path, stage1_cache):
    (stage1_cache / "manifest.json").unlink()
    cfg = load_config(None, overrides(tiny_clip, tmp_path / "r", data__source="cache", data__path=stage1_cache))
    with pytest.raises(ConfigError, match="not a complete genhancer cache"):
        open_cache(cfg, build_enhancer(cfg))
    with pytest.raises(ConfigError, match="not empty"):
        build_cache(load_config(None, overrides(tiny_clip, tmp_path / "r")), stage1_cache)


def test_weights_drawn_on_the_device_reach_the_run_and_its_cache_alike(tiny_clip, overrides, tmp_path, vae,
                                                                       build_devices):
    """model.init_on_device: the trainer builds on the run's device and the cache on its own, so a random-init
    backbone's cache still fits the run; on the CPU the weights are the ones drawn without it."""
    model = dict(model__latent="autoencoder", model__latent_path=vae, model__random_init=True, steps=2)
    plain, _ = run(overrides, tiny_clip, tmp_path / "plain", **model)
    images, cfg = run(overrides, tiny_clip, tmp_path / "images", model__init_on_device=True, **model)
    torch.manual_seed(cfg.train.seed)  # the random backbone of the cache is the run's
    build_cache(cfg, tmp_path / "cache", device="cpu", batch_size=8, log=lambda *_: None)
    cached, _ = run(overrides, tiny_clip, tmp_path / "cached", model__init_on_device=True, data__source="cache",
                    data__path=tmp_path / "cache", **model)
    assert [d for d in build_devices if d != "meta"] == ["None", "cpu", "cpu", "cpu"]  # plain, images, cache, cached
    assert losses(images) == losses(plain)
    assert losses(cached) == pytest.approx(losses(images), rel=1e-5)


def test_the_cache_command_draws_random_encoders_as_the_run_does(tiny_clip, overrides, tmp_path, vae):
    """`genhancer cache` with a model.random_init backbone seeds it from train.seed, as the trainer does: the run
    accepts the cache (it checks the backbone's weights) and trains with the losses of the images."""
    from genhancer.cli import main

    model = dict(model__latent="autoencoder", model__latent_path=vae, model__random_init=True, steps=2)
    torch.manual_seed(123)  # whatever the caller's generator holds
    assert main(["cache", "--out", str(tmp_path / "cache"), *overrides(tiny_clip, tmp_path / "unused", **model)]) == 0
    images, _ = run(overrides, tiny_clip, tmp_path / "images", **model)
    cached, _ = run(overrides, tiny_clip, tmp_path / "cached", data__source="cache", data__path=tmp_path / "cache",
                    **model)
    assert losses(cached) == pytest.approx(losses(images), rel=1e-5)
