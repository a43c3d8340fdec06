"""Discrete denoiser: masked-only loss, condition path, deterministic draws, mask ratios, decoding, presets."""

import types

import pytest
import torch

from genhancer.config import ConfigError, ObjectiveConfig, load_config
from genhancer.denoisers import DENOISERS
from genhancer.denoisers import perceiver as P
from genhancer.enhancer import build_head, denoiser_arch
from genhancer.objectives import MASK_RATIOS, MaskedTokens

K, D_COND = 32, 24
LATENT = types.SimpleNamespace(codebook_size=K, kind="discrete")
OBJ = MaskedTokens(ObjectiveConfig())


def masked(**objective):
    return MaskedTokens(ObjectiveConfig(**objective))


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
    assert [DENOISERS[f"perceiver-l{n}"].arch.depth for n in (2, 4, 6, 8)] == [2, 4, 6, 8]
    with torch.device("meta"):
        head = P.build(DENOISERS["perceiver-l6"].arch, 1024, types.SimpleNamespace(codebook_size=16384))
    assert P.LATENT_KIND == MaskedTokens.latent_kind == "discrete" and len(head.denoiser.blocks) == 6
    assert next(head.parameters()).is_meta


def test_fresh_head_predicts_uniform():
    head = build_head("perceiver-tiny", None, D_COND, LATENT)
    target, cond = _batch()
    loss = OBJ.loss(head, target, cond, OBJ.draw(2, (4, 4), torch.Generator().manual_seed(0)))
    assert torch.allclose(loss, torch.full((2,), float(torch.log(torch.tensor(K)))))


def test_only_masked_positions_carry_loss():
    head = _head()
    target, cond = _batch()
    draws = OBJ.draw(2, (4, 4), torch.Generator().manual_seed(0))
    mask = draws["mask"]
    # Fix the logits (a test double of the denoiser) so only the cross-entropy targets vary.
    fixed = head(target, mask, cond).detach().requires_grad_(True)
    head.forward = lambda tokens, masked, c: fixed
    base = OBJ.loss(head, target, cond, draws)
    base.sum().backward()
    assert (fixed.grad[~mask] == 0).all() and (fixed.grad[mask] != 0).any(dim=-1).all()
    b, i, j = (~mask).nonzero()[0].tolist()
    changed = target.clone()
    changed[b, i, j] = (changed[b, i, j] + 1) % K
    assert torch.equal(OBJ.loss(head, changed, cond, draws), base)
    b, i, j = mask.nonzero()[0].tolist()
    changed = target.clone()
    changed[b, i, j] = (changed[b, i, j] + 1) % K
    assert not torch.equal(OBJ.loss(head, changed, cond, draws)[b], base[b])


def test_masked_token_values_are_never_seen():
    head = _head()
    target, cond = _batch()
    mask = OBJ.draw(2, (4, 4), torch.Generator().manual_seed(1))["mask"]
    scrambled = torch.where(mask, torch.randint_like(target, K), target)
    assert torch.equal(head(target, mask, cond), head(scrambled, mask, cond))


@pytest.mark.parametrize("local_tokens", [0, 3])
def test_condition_reaches_prediction(local_tokens):
    head = _head()
    target, cond = _batch()
    cond = torch.cat([cond, torch.randn(2, local_tokens, D_COND)], dim=1)  # "cls" and "cls+local"
    mask = OBJ.draw(2, (4, 4), torch.Generator().manual_seed(0))["mask"]
    other = cond.clone()
    other[:, -1] += 1.0
    assert not torch.allclose(head(target, mask, cond), head(target, mask, other))
    # Fully masked (where decoding starts): the condition still reaches every position through the buffer query.
    full = torch.ones_like(mask)
    assert not torch.allclose(head(target, full, cond), head(target, full, other))
    # Test double without the condition tokens in the keys / values: the dependence is gone.
    head.projector.forward = lambda c: head.projector.net(c)[:, :0]
    assert torch.equal(head(target, mask, cond), head(target, mask, other))


def test_loss_gradients_reach_condition():
    head = _head()
    target, cond = _batch()
    cond.requires_grad_(True)
    OBJ.loss(head, target, cond, OBJ.draw(2, (4, 4), torch.Generator().manual_seed(0))).sum().backward()
    assert cond.grad.abs().sum() > 0


def test_draws_deterministic_by_generator():
    a = OBJ.draw(8, (5, 6), torch.Generator().manual_seed(3))["mask"]
    b = OBJ.draw(8, (5, 6), torch.Generator().manual_seed(3))["mask"]
    c = OBJ.draw(8, (5, 6), torch.Generator().manual_seed(4))["mask"]
    assert a.shape == (8, 5, 6) and a.dtype == torch.bool
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mask_ratio_range_and_fixed():
    ratios = OBJ.draw(2000, (10, 10), torch.Generator().manual_seed(0))["mask"].float().mean((1, 2))
    assert ratios.min() >= 0.5 and ratios.max() <= 0.9
    assert ratios.min() < 0.52 and ratios.max() > 0.88 and abs(ratios.mean() - 0.7) < 0.01  # ~U[0.5, 0.9]
    objective = masked(mask_ratio_min=0.2, mask_ratio_max=0.3)
    ratios = objective.draw(500, (10, 10), torch.Generator().manual_seed(0))["mask"].float().mean((1, 2))
    assert ratios.min() >= 0.2 and ratios.max() <= 0.3
    objective = masked(mask_ratio=0.75)
    ratios = objective.draw(50, (10, 10), torch.Generator().manual_seed(0))["mask"].float().mean((1, 2))
    assert (ratios == 0.75).all()


def test_sample_shape_range_and_determinism():
    head = _head()
    _, cond = _batch()
    a = OBJ.sample(head, cond, (4, 4), torch.Generator().manual_seed(0), steps=4)
    b = OBJ.sample(head, cond, (4, 4), torch.Generator().manual_seed(0), steps=4)
    assert a.shape == (2, 4, 4) and a.dtype == torch.long and a.min() >= 0 and a.max() < K
    assert torch.equal(a, b)
    assert OBJ.sample(head, cond, (3, 5), torch.Generator().manual_seed(0), steps=1).shape == (2, 3, 5)


def test_training_lowers_loss():
    head = build_head("perceiver-tiny", None, D_COND, LATENT)
    target, cond = _batch(B=4)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = OBJ.loss(head, target, cond, OBJ.draw(4, (4, 4), g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])


def test_bad_shapes_are_value_errors_of_the_network_and_objective():
    """Networks and objectives raise ValueError (no config layer below genhancer.enhancer), naming the fix."""
    tiny = DENOISERS["perceiver-tiny"].arch
    bad = [
        ("max_grid=20", lambda: OBJ.loss(_head(), *_batch(h=20, w=20)[:1], torch.randn(2, 1, D_COND),
                                         {"mask": torch.ones(2, 20, 20, dtype=torch.bool)})),
        ("configured for 1024", lambda: P.build(denoiser_arch("perceiver-tiny", {"codebook_size": 1024}), D_COND,
                                                LATENT)),
        (f"predicts {2 * K} codes but the VQ tokenizer has {K}", lambda: _head().load_state_dict(
            P.build(tiny, D_COND, types.SimpleNamespace(codebook_size=2 * K)).state_dict(), strict=False)),
        ("max_grid=8", lambda: _head().load_state_dict(build_head("perceiver-tiny", {"max_grid": 8}, D_COND,
                                                                  LATENT).state_dict())),
        ("discrete latent", lambda: OBJ.loss(_head(), torch.randn(2, 4, 4, 4), torch.randn(2, 1, D_COND),
                                             {"mask": torch.ones(2, 4, 4).bool()})),
        ("discrete latent", lambda: OBJ.loss(_head(), torch.randn(2, 4, 4), torch.randn(2, 1, D_COND),
                                             {"mask": torch.ones(2, 4, 4).bool()})),
    ]
    for needle, call in bad:
        with pytest.raises(ValueError, match=needle) as e:
            call()
        assert not isinstance(e.value, ConfigError), needle


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="configured for 1024"):
        build_head("perceiver-tiny", {"codebook_size": 1024}, D_COND, LATENT)
    with pytest.raises(ConfigError, match=r"objective.mask_ratio must be in \(0, 1\)"):
        load_config(overrides=["objective.mask_ratio=1.0", "data.source=synthetic"])
    with pytest.raises(ConfigError, match="model.denoiser_arch.depht.*did you mean 'depth'"):
        denoiser_arch("perceiver-l6", {"depht": 3})
    with pytest.raises(ConfigError, match="did you mean 'perceiver-l6'"):
        denoiser_arch("perceiver-16")
    with pytest.raises(ConfigError, match="objective.mask_sampling must be one of 'uniform'"):
        load_config(overrides=["objective.mask_sampling=cosine", "data.source=synthetic"])


def test_integer_and_float32_cached_indices_give_the_same_loss():
    head = _head()
    target, cond = _batch()
    draws = OBJ.draw(2, (4, 4), torch.Generator().manual_seed(0))
    base = OBJ.loss(head, target, cond, draws)
    assert torch.equal(OBJ.loss(head, target.int(), cond, draws), base)
    assert torch.equal(OBJ.loss(head, target.float(), cond, draws), base)


@pytest.mark.parametrize("backbone", ["openai-clip-vit-l-14-224", "siglip-so400m-14-224", "siglip-so400m-14-384"])
def test_recipes_load(backbone):
    from importlib import resources

    from genhancer.config import load_config

    root = resources.files("genhancer").joinpath("recipes", "discrete")
    for stage in ("stage1", "stage2"):
        cfg = load_config(str(root.joinpath(f"{backbone}-{stage}.yaml")))
        assert (cfg.model.latent, cfg.model.denoiser, cfg.stage.stage) == ("vq", "perceiver-l6", stage)
        assert (cfg.objective.mask_ratio_min, cfg.objective.mask_ratio_max) == (0.5, 0.9)
        arch = denoiser_arch(cfg.model.denoiser, cfg.model.denoiser_arch)
        assert arch.max_grid >= (384 if "384" in backbone else 224) // 16


def test_grad_checkpointing_gives_the_same_gradients():
    target, cond = _batch()
    grads = []
    for recompute in (False, True):
        head = _head()
        head.denoiser.grad_checkpointing = recompute
        OBJ.loss(head, target, cond, OBJ.draw(2, (4, 4), torch.Generator().manual_seed(0))).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in head.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_a_new_mask_ratio_rule_is_one_registered_function(monkeypatch):
    """The registry is the only place a masking rule is named: config validation and draws both follow it."""
    monkeypatch.setitem(MASK_RATIOS, "quarter", lambda n, generator, cfg: torch.full((n,), 0.25))
    cfg = load_config(overrides=["objective.mask_sampling=quarter", "data.source=synthetic"])
    objective = MaskedTokens(cfg.objective)
    draws = objective.draw(16, (4, 4), torch.Generator().manual_seed(0))
    assert (draws["mask"].sum((1, 2)) == 4).all()
    head = build_head("perceiver-tiny", None, D_COND, LATENT)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    target, cond = _batch(B=16)
    losses = []
    for _ in range(5):
        loss = objective.loss(head, target, cond, draws).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
