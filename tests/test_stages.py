"""Gradients reach exactly what each stage says."""

import pytest
import torch

from genhancer.config import load_config
from genhancer.enhancer import apply_stage, build_enhancer


def grads_after_one_backward(backbone, overrides, tmp_path, **extra):
    cfg = load_config(None, overrides(backbone, tmp_path, **extra))
    enh = build_enhancer(cfg)
    for p in enh.head.parameters():  # leave zero-init so gradients reach every parameter
        torch.nn.init.normal_(p, std=0.05)
    apply_stage(enh, cfg.stage)
    batch = {"pixels": torch.rand(2, 3, 32, 32)}
    loss = enh(batch, {k: v[:2] for k, v in enh.draw(2, torch.Generator().manual_seed(0)).items()}).mean()
    loss.backward()
    got = lambda prefix: {n for n, p in enh.named_parameters() if n.startswith(prefix) and p.grad is not None
                          and p.grad.abs().sum() > 0}
    trainable = lambda prefix: {n for n, p in enh.named_parameters() if n.startswith(prefix) and p.requires_grad}
    return got, trainable, enh


def test_stage1_trains_head_only(tiny_clip, overrides, tmp_path):
    got, trainable, enh = grads_after_one_backward(tiny_clip, overrides, tmp_path)
    assert got("backbone") == set() == trainable("backbone")
    assert got("head") == trainable("head") == {n for n, _ in enh.named_parameters() if n.startswith("head")}
    assert not enh.backbone.training


def test_stage2_lora_trains_lora_only(tiny_clip, overrides, tmp_path):
    got, trainable, enh = grads_after_one_backward(tiny_clip, overrides, tmp_path, stage="stage2",
                                                   stage__lora_dropout=0.0)
    assert got("head") == set() == trainable("head")
    assert trainable("backbone") and all("lora_" in n for n in trainable("backbone"))
    assert {n for n in got("backbone") if "lora_A" in n or "lora_B" in n} == got("backbone")
    assert any("lora_B" in n for n in got("backbone"))  # B starts at zero, so A's grads appear after a step


def test_stage2_train_head_and_full_finetune(tiny_clip, overrides, tmp_path):
    got, trainable, _ = grads_after_one_backward(tiny_clip, overrides, tmp_path, stage="stage2",
                                                 stage__train_head="true", stage__finetune="full")
    assert got("head") == trainable("head") and got("head")
    vision = trainable("backbone.model.vision_model")
    assert vision and not any("lora" in n for n in vision)
    assert trainable("backbone") == vision  # text tower and projection stay frozen
    assert got("backbone") <= vision


def test_e2e_trains_encoder_and_head(tiny_clip, overrides, tmp_path):
    got, trainable, _ = grads_after_one_backward(tiny_clip, overrides, tmp_path, stage="e2e")
    assert got("head") == trainable("head") and got("head")
    assert trainable("backbone") and all("lora_" in n for n in trainable("backbone"))


@pytest.mark.parametrize("ratio, expected", [(1.0, 17), (0.25, 5)])
def test_cls_plus_local_condition_has_the_right_number_of_tokens(tiny_clip, overrides, tmp_path, ratio, expected):
    cfg = load_config(None, overrides(tiny_clip, tmp_path, model__condition="cls+local", model__local_ratio=ratio))
    enh = build_enhancer(cfg)
    draws = enh.draw(2, torch.Generator().manual_seed(0))
    cond = enh.condition({"pixels": torch.rand(2, 3, 32, 32)}, draws["local_index"])
    assert cond.shape == (2, expected, 16)


def test_objective_and_training_settings_reach_the_objective_and_network(tiny_clip, overrides, tmp_path):
    cfg = load_config(None, overrides(tiny_clip, tmp_path, objective__logit_normal_mean=1.5,
                                      objective__logit_normal_scale=0.5, objective__timestep_sampling="uniform",
                                      train__grad_checkpointing="true"))
    enh = build_enhancer(cfg)
    o = enh.objective.cfg
    assert (o.logit_normal_mean, o.logit_normal_scale, o.timestep_sampling) == (1.5, 0.5, "uniform")
    assert enh.head.denoiser.grad_checkpointing
    assert not build_enhancer(load_config(None, overrides(tiny_clip, tmp_path))).head.denoiser.grad_checkpointing


def test_live_and_cached_conditions_are_the_same_selection(tiny_clip, overrides, tmp_path):
    """select_condition picks [global; chosen local tokens] alike from the live backbone and from a cache."""
    cfg = load_config(None, overrides(tiny_clip, tmp_path, model__condition="cls+local", model__local_ratio=0.25))
    enh = build_enhancer(cfg).eval()
    pixels = torch.rand(2, 3, 32, 32)
    local_index = enh.draw(2, torch.Generator().manual_seed(0))["local_index"]
    with torch.no_grad():
        cached = enh.backbone(pixels, local=True)  # what a stage-1 cache stores: global + every patch token
        live = enh.condition({"pixels": pixels}, local_index)
        assert cached.shape == (2, 1 + enh.backbone.num_patches, 16)
        torch.testing.assert_close(enh.condition({"cond": cached}, local_index), live)
        torch.testing.assert_close(enh.condition({"cond": cached}, None), enh.condition({"pixels": pixels}, None))
        assert torch.equal(live[:, 1:], cached[torch.arange(2)[:, None], 1 + local_index])


def test_random_weights_are_drawn_on_the_given_device_and_pretrained_ones_load_on_the_cpu(tiny_clip, overrides,
                                                                                          tmp_path):
    """build_enhancer(device=...) (model.init_on_device): the head, and a random_init backbone, are made there;
    a pretrained backbone is loaded on the CPU as without a device (the meta device stands in for a GPU)."""
    cfg = load_config(None, overrides(tiny_clip, tmp_path))
    enh = build_enhancer(cfg, device="meta")
    assert {p.device.type for p in enh.head.parameters()} == {"meta"}
    loaded = build_enhancer(cfg).backbone.state_dict()
    assert {k: v.device.type for k, v in enh.backbone.state_dict().items()} == {k: "cpu" for k in loaded}
    assert all(torch.equal(v, loaded[k]) for k, v in enh.backbone.state_dict().items())
    random = build_enhancer(load_config(None, overrides(tiny_clip, tmp_path, model__random_init=True)), device="meta")
    assert {p.device.type for p in random.backbone.parameters()} == {p.device.type for p in random.head.parameters()} \
        == {"meta"}
