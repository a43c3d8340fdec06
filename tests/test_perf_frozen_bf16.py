"""train.frozen_bf16: the frozen encoders run in bf16 inside an fp32 step; trainable ones keep fp32."""

import dataclasses

import torch

from genhancer.bench import tiny_autoencoder
from genhancer.config import load_config
from genhancer.enhancer import apply_stage, build_enhancer


def test_frozen_encoders_run_in_bf16_and_hand_float32_to_the_step(tiny_clip, overrides, tmp_path):
    vae = tiny_autoencoder(tmp_path / "vae")
    cfg = load_config(None, overrides(tiny_clip, tmp_path, model__latent="autoencoder", model__latent_path=vae,
                                      train__frozen_bf16=True))
    enh = build_enhancer(cfg)
    assert enh.frozen_bf16
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def encoded(frozen_bf16):
        enh.frozen_bf16 = frozen_bf16
        with torch.no_grad():
            return enh.target({"pixels": pixels}), enh.tokens(pixels, local=False)

    apply_stage(enh, cfg.stage)  # stage 1: the vision encoder is frozen too
    for fp32, bf16 in zip(encoded(False), encoded(True)):
        assert bf16.dtype == torch.float32
        error = ((bf16 - fp32).norm() / fp32.norm()).item()
        assert 0 < error < 0.03  # rounded (it did run in bf16), within bf16's precision

    apply_stage(enh, dataclasses.replace(cfg.stage, stage="stage2"))  # the encoder is tuned: it keeps fp32
    (target32, tokens32), (target16, tokens16) = encoded(False), encoded(True)
    assert torch.equal(tokens16, tokens32) and not torch.equal(target16, target32)
