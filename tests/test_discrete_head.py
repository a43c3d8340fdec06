"""Discrete denoiser: masked-only loss, condition path, deterministic draws, mask ratios, decoding, presets."""

import types

import pytest
import torch

from genhancer.config import ConfigError
from genhancer.denoisers import DENOISERS, build_head, denoiser_arch
from genhancer.denoisers import perceiver as P

K, D_COND = 32, 24
LATENT = types.SimpleNamespace(codebook_size=K, kind="discrete")


def _head(seed=0, **overrides):
    torch.manual_seed(seed)
    head = build_head("perceiver-tiny", overrides, D_COND, LATENT)
    torch.nn.init.normal_(head.denoiser.logits.weight, std=0.5)  # zero-init logits would hide every dependence
    return head


def _batch(seed=0, B=2, h=4, w=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(K, (B, h, w), generator=g), torch.randn(B, 1, D_COND, generator=g)


def test_presets_and_meta_build():
    assert {"perceiver-l2", "perceiver-l4", "perceiver-l6", "perceiver-l8", "perceiver-tiny"} <= set(DENOISERS)
    assert [P.PRESETS[f"perceiver-l{n}"].depth for n in (2, 4, 6, 8)] == [2, 4, 6, 8]
    with torch.device("meta"):
        head = P.build(P.PRESETS["perceiver-l6"], 1024, types.SimpleNamespace(codebook_size=16384))
    assert head.latent_kind == "discrete" and len(head.denoiser.blocks) == 6
    assert next(head.parameters()).is_meta


def test_fresh_head_predicts_uniform():
    head = build_head("perceiver-tiny", None, D_COND, LATENT)
    target, cond = _batch()
    loss = head.loss(target, cond, head.draw(2, (4, 4), torch.Generator().manual_seed(0)))
    assert torch.allclose(loss, torch.full((2,), float(torch.log(torch.tensor(K)))))


def test_only_masked_positions_carry_loss():
    head = _head()
    target, cond = _batch()
    draws = head.draw(2, (4, 4), torch.Generator().manual_seed(0))
    mask = draws["mask"]
    # Fix the logits (a test double of the denoiser) so only the cross-entropy targets vary.
    fixed = head.logits(target, mask, cond).detach().requires_grad_(True)
    head.logits = lambda tokens, masked, c: fixed
    base = head.loss(target, cond, draws)
    base.sum().backward()
    assert (fixed.grad[~mask] == 0).all() and (fixed.grad[mask] != 0).any(dim=-1).all()
    b, i, j = (~mask).nonzero()[0].tolist()
    changed = target.clone()
    changed[b, i, j] = (changed[b, i, j] + 1) % K
    assert torch.equal(head.loss(changed, cond, draws), base)
    b, i, j = mask.nonzero()[0].tolist()
    changed = target.clone()
    changed[b, i, j] = (changed[b, i, j] + 1) % K
    assert not torch.equal(head.loss(changed, cond, draws)[b], base[b])


def test_masked_token_values_are_never_seen():
    head = _head()
    target, cond = _batch()
    mask = head.draw(2, (4, 4), torch.Generator().manual_seed(1))["mask"]
    scrambled = torch.where(mask, torch.randint_like(target, K), target)
    assert torch.equal(head.logits(target, mask, cond), head.logits(scrambled, mask, cond))


@pytest.mark.parametrize("local_tokens", [0, 3])
def test_condition_reaches_prediction(local_tokens):
    head = _head()
    target, cond = _batch()
    cond = torch.cat([cond, torch.randn(2, local_tokens, D_COND)], dim=1)  # "cls" and "cls+local"
    mask = head.draw(2, (4, 4), torch.Generator().manual_seed(0))["mask"]
    other = cond.clone()
    other[:, -1] += 1.0
    assert not torch.allclose(head.logits(target, mask, cond), head.logits(target, mask, other))
    # Fully masked (where decoding starts): the condition still reaches every position through the buffer query.
    full = torch.ones_like(mask)
    assert not torch.allclose(head.logits(target, full, cond), head.logits(target, full, other))
    # Test double without the condition tokens in the keys / values: the dependence is gone.
    head.projector.forward = lambda c: head.projector.net(c)[:, :0]
    assert torch.equal(head.logits(target, mask, cond), head.logits(target, mask, other))


def test_loss_gradients_reach_condition():
    head = _head()
    target, cond = _batch()
    cond.requires_grad_(True)
    head.loss(target, cond, head.draw(2, (4, 4), torch.Generator().manual_seed(0))).sum().backward()
    assert cond.grad.abs().sum() > 0


def test_draws_deterministic_by_generator():
    head = _head()
    a = head.draw(8, (5, 6), torch.Generator().manual_seed(3))["mask"]
    b = head.draw(8, (5, 6), torch.Generator().manual_seed(3))["mask"]
    c = head.draw(8, (5, 6), torch.Generator().manual_seed(4))["mask"]
    assert a.shape == (8, 5, 6) and a.dtype == torch.bool
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mask_ratio_range_and_fixed():
    head = _head()
    ratios = head.draw(2000, (10, 10), torch.Generator().manual_seed(0))["mask"].float().mean((1, 2))
    assert ratios.min() >= 0.5 and ratios.max() <= 0.9
    assert ratios.min() < 0.52 and ratios.max() > 0.88 and abs(ratios.mean() - 0.7) < 0.01  # ~U[0.5, 0.9]
    head = _head(mask_ratio_min=0.2, mask_ratio_max=0.3)
    ratios = head.draw(500, (10, 10), torch.Generator().manual_seed(0))["mask"].float().mean((1, 2))
    assert ratios.min() >= 0.2 and ratios.max() <= 0.3
    head = _head(mask_ratio=0.75)
    ratios = head.draw(50, (10, 10), torch.Generator().manual_seed(0))["mask"].float().mean((1, 2))
    assert (ratios == 0.75).all()


def test_sample_shape_range_and_determinism():
    head = _head()
    _, cond = _batch()
    a = head.sample(cond, (4, 4), torch.Generator().manual_seed(0), steps=4)
    b = head.sample(cond, (4, 4), torch.Generator().manual_seed(0), steps=4)
    assert a.shape == (2, 4, 4) and a.dtype == torch.long and a.min() >= 0 and a.max() < K
    assert torch.equal(a, b)
    assert head.sample(cond, (3, 5), torch.Generator().manual_seed(0), steps=1).shape == (2, 3, 5)


def test_training_lowers_loss():
    head = build_head("perceiver-tiny", None, D_COND, LATENT)
    target, cond = _batch(B=4)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = head.loss(target, cond, head.draw(4, (4, 4), g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])


def test_bad_inputs_are_config_errors():
    with pytest.raises(ConfigError, match="max_grid=20"):
        _head().loss(*_batch(h=20, w=20)[:1], torch.randn(2, 1, D_COND),
                     {"mask": torch.ones(2, 20, 20, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="configured for 1024"):
        build_head("perceiver-tiny", {"codebook_size": 1024}, D_COND, LATENT)
    saved = P.build(P.PRESETS["perceiver-tiny"], D_COND, types.SimpleNamespace(codebook_size=2 * K)).state_dict()
    with pytest.raises(ConfigError, match=f"predicts {2 * K} codes but the VQ tokenizer has {K}"):
        _head().load_state_dict(saved, strict=False)
    saved = build_head("perceiver-tiny", {"max_grid": 8}, D_COND, LATENT).state_dict()
    with pytest.raises(ConfigError, match="max_grid=8"):
        _head().load_state_dict(saved)
    with pytest.raises(ConfigError, match="mask ratios must lie in"):
        build_head("perceiver-tiny", {"mask_ratio": 1.0}, D_COND, LATENT)
    with pytest.raises(ConfigError, match="model.denoiser_arch.depht"):
        denoiser_arch("perceiver-l6", {"depht": 3})
    with pytest.raises(ConfigError, match="discrete latent"):
        _head().loss(torch.randn(2, 4, 4, 4), torch.randn(2, 1, D_COND), {"mask": torch.ones(2, 4, 4).bool()})
    with pytest.raises(ConfigError, match="discrete latent"):
        _head().loss(torch.randn(2, 4, 4), torch.randn(2, 1, D_COND), {"mask": torch.ones(2, 4, 4).bool()})


def test_integer_and_float32_cached_indices_give_the_same_loss():
    head = _head()
    target, cond = _batch()
    draws = head.draw(2, (4, 4), torch.Generator().manual_seed(0))
    base = head.loss(target, cond, draws)
    assert torch.equal(head.loss(target.int(), cond, draws), base)
    assert torch.equal(head.loss(target.float(), cond, draws), base)


@pytest.mark.parametrize("backbone", ["openai-clip-vit-l-14-224", "siglip-so400m-14-224", "siglip-so400m-14-384"])
def test_recipes_load(backbone):
    from importlib import resources

    from genhancer.config import load_config

    root = resources.files("genhancer").joinpath("recipes", "discrete")
    for stage in ("stage1", "stage2"):
        cfg = load_config(str(root.joinpath(f"{backbone}-{stage}.yaml")))
        assert (cfg.model.latent, cfg.model.denoiser, cfg.stage.stage) == ("vq", "perceiver-l6", stage)
        assert (cfg.objective.mask_ratio_min, cfg.objective.mask_ratio_max) == (0.5, 0.9)
        arch = denoiser_arch(cfg.model.denoiser, {"mask_ratio_min": cfg.objective.mask_ratio_min})
        assert arch.max_grid >= (384 if "384" in backbone else 224) // 16


def test_grad_checkpointing_gives_the_same_gradients():
    target, cond = _batch()
    grads = []
    for recompute in (False, True):
        head = _head(grad_checkpointing=recompute)
        head.loss(target, cond, head.draw(2, (4, 4), torch.Generator().manual_seed(0))).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in head.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
