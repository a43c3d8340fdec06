import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genhancer.config import ConfigError, ObjectiveConfig, load_config
from genhancer.denoisers import DENOISERS
from genhancer.denoisers.flux import Flux
from genhancer.denoisers.layers import apply_rope_, rope_table
from genhancer.enhancer import build_enhancer, build_head
from genhancer.latents import PixelSpace
from genhancer.objectives import TIMESTEP_SCHEDULES, RectifiedFlow


def tiny_head(**arch):
    return build_head("flux-tiny", arch, 16, PixelSpace(2))


def flow(**objective):
    return RectifiedFlow(ObjectiveConfig(**objective))


def test_paper_preset_has_the_papers_parameter_count():
    with torch.device("meta"):
        model = Flux(DENOISERS["flux-paper"].arch)
    assert sum(p.numel() for p in model.parameters()) == 1_310_154_816
    assert (len(model.double_blocks), len(model.single_blocks)) == (2, 4)


def test_zero_init_makes_the_untrained_denoiser_output_zero():
    v = flow().velocity(tiny_head(), torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 1, 16))
    assert v.abs().max() == 0


def test_loss_is_rectified_flow_mse_in_the_release_convention():
    head = tiny_head()
    torch.nn.init.normal_(head.denoiser.final_layer.linear.weight, std=0.1)
    x, cond = torch.randn(3, 3, 16, 16), torch.randn(3, 1, 16)
    f = flow()
    draws = f.draw(3, (3, 16, 16), torch.Generator().manual_seed(1))
    t = draws["t"].view(3, 1, 1, 1)
    x_t = (1 - t) * x + t * draws["noise"]  # t = 1 is noise
    expected = ((f.velocity(head, x_t, draws["t"], cond) - (draws["noise"] - x)) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(f.loss(head, x, cond, draws), expected)


def test_euler_sampler_follows_the_same_convention():
    """With the exact velocity of a fixed target, the sampler must land on that target."""
    f = flow()
    target = torch.randn(2, 3, 16, 16)

    def oracle(head, x_t, t, cond):  # x_t = (1 - t) target + t noise  =>  velocity = (x_t - target) / t
        return (x_t - target) / t.view(-1, 1, 1, 1)

    f.velocity = oracle
    out = f.sample(tiny_head(), torch.randn(2, 1, 16), (3, 16, 16), torch.Generator().manual_seed(0), steps=5)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=1e-5)


def test_timestep_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    t_u = flow(timestep_sampling="uniform").draw(20000, (3, 2, 2), g)["t"]
    t_ln = flow(logit_normal_scale=1.0).draw(20000, (3, 2, 2), g)["t"]
    t_wide = flow(logit_normal_scale=5.0).draw(20000, (3, 2, 2), g)["t"]
    assert abs(t_u.mean() - 0.5) < 0.01 and abs(t_u.var() - 1 / 12) < 0.003
    logit = torch.log(t_ln / (1 - t_ln))  # logit of sigmoid(s * eps) is s * eps ~ N(0, s^2)
    assert abs(logit.std() - 1.0) < 0.03
    assert ((t_wide < 0.05) | (t_wide > 0.95)).float().mean() > 0.5  # large s pushes t to the ends
    t_noisy = flow(logit_normal_mean=1.5).draw(20000, (3, 2, 2), g)["t"]
    assert abs(torch.log(t_noisy / (1 - t_noisy)).mean() - 1.5) < 0.03  # a mean m shifts t towards noise


def test_a_uniform_share_replaces_that_share_of_the_timesteps_by_uniform_draws():
    """share 0 draws what the schedule alone draws (a run's stream is unchanged); otherwise, after the noise and the
    schedule's t, one U[0, 1) per sample picks the swapped ones (< share) and one more per sample is their new t."""
    n, shape = 20000, (3, 2, 2)
    cfg = dict(logit_normal_mean=1.0, logit_normal_scale=0.1)
    g = torch.Generator().manual_seed(3)  # the stream, replayed by hand
    noise = torch.randn((n, *shape), generator=g)
    t = torch.sigmoid(1.0 + 0.1 * torch.randn(n, generator=g))
    g_zero = torch.Generator().manual_seed(3)
    zero = flow(**cfg, uniform_share=0.0).draw(n, shape, g_zero)
    assert torch.equal(zero["t"], t) and torch.equal(zero["noise"], noise)
    assert torch.equal(g_zero.get_state(), g.get_state())  # and the next step's draws are unchanged too
    mixed = flow(**cfg, uniform_share=0.25).draw(n, shape, torch.Generator().manual_seed(3))
    swap, u = torch.rand(n, generator=g) < 0.25, torch.rand(n, generator=g)
    assert torch.equal(mixed["noise"], noise) and torch.equal(mixed["t"], torch.where(swap, u, t))
    assert abs(swap.float().mean() - 0.25) < 0.01
    # s = 0.1 keeps the schedule's t within [0.6, 0.85]; the uniform share covers the ends the sampler visits
    assert ((mixed["t"] < 0.1) | (mixed["t"] > 0.9)).float().mean() > 0.04 > ((t < 0.1) | (t > 0.9)).float().mean()
    everything = flow(**cfg, uniform_share=1.0).draw(n, shape, torch.Generator().manual_seed(0))["t"]
    assert abs(everything.mean() - 0.5) < 0.01 and abs(everything.var() - 1 / 12) < 0.003


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_a_uniform_share_outside_0_1_is_refused(share):
    from genhancer.config import RunConfig, validate

    cfg = RunConfig()
    cfg.objective.uniform_share = share
    with pytest.raises(ConfigError, match=rf"objective.uniform_share must be in \[0, 1\], got {share}"):
        validate(cfg)


def test_draws_are_a_function_of_the_generator_only():
    a = flow().draw(4, (3, 16, 16), torch.Generator().manual_seed(7))
    b = flow().draw(4, (3, 16, 16), torch.Generator().manual_seed(7))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_condition_reaches_the_prediction_through_both_paths():
    head = tiny_head()
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x_t, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    c1, c2 = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    assert not torch.allclose(flow().velocity(head, x_t, t, c1), flow().velocity(head, x_t, t, c2))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 50), st.integers(0, 50), st.integers(0, 50))
def test_rope_preserves_norms_and_depends_on_relative_position(r, c, shift):
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)  # (B, L, H, Dh)
    apply_rope = lambda x, table: apply_rope_(x.clone(), table)
    rot = lambda pos: rope_table(torch.tensor([pos], dtype=torch.float32), (4, 6, 6), 10_000)[:, None]  # (1, 1, 8)
    p1, p2 = rot([0, r, c]), rot([0, r + shift, c + shift])
    torch.testing.assert_close(apply_rope(q, p1).norm(), q.norm())
    s1 = (apply_rope(q, p1) * apply_rope(k, p2)).sum()
    s0 = (apply_rope(q, rot([0, 0, 0])) * apply_rope(k, rot([0, shift, shift]))).sum()
    torch.testing.assert_close(s1, s0, atol=1e-4, rtol=1e-4)  # the score depends on the offset only


def test_rope_rotates_consecutive_pairs_by_position_times_frequency():
    table = rope_table(torch.tensor([[0.0, 3.0, 5.0]]), (2, 2, 4), 100)  # (1, 4): axes 1, 1, 2 frequencies
    assert table.shape == (1, 4) and table.dtype == torch.complex64
    angles = torch.tensor([0.0, 3.0, 5.0, 5.0 * 100 ** -0.5])
    torch.testing.assert_close(torch.view_as_real(table[0]), torch.stack([angles.cos(), angles.sin()], -1))
    x = torch.tensor([[1.0, 0.0] * 4])  # (1, 8): four unit pairs along the real axis
    torch.testing.assert_close(apply_rope_(x, table), torch.stack([angles.cos(), angles.sin()], -1).flatten()[None])


def test_presets_are_well_formed():
    flux = {name: p.arch for name, p in DENOISERS.items() if p.family == "flux"}
    assert set(flux) == {"flux-paper", "flux-n1", "flux-n3", "flux-n4", "flux-small", "flux-mini", "flux-tiny"}
    for name, arch in flux.items():
        assert sum(arch.axes_dim) == arch.hidden // arch.heads, name
    assert dataclasses.replace(flux["flux-paper"]).depth_single is None


def test_a_new_timestep_schedule_is_one_registered_function(tiny_clip, overrides, tmp_path, monkeypatch):
    """The registry is the only place a schedule is named: config validation, draws and training all follow it."""
    with pytest.raises(ConfigError, match="objective.timestep_sampling must be one of 'logit-normal', 'uniform'"):
        load_config(None, overrides(tiny_clip, tmp_path, objective__timestep_sampling="mid"))
    monkeypatch.setitem(TIMESTEP_SCHEDULES, "mid", lambda n, generator, cfg: 0.4 + 0.2 * torch.rand(n, generator=generator))
    enh = build_enhancer(load_config(None, overrides(tiny_clip, tmp_path, objective__timestep_sampling="mid")))
    draws = enh.draw(256, torch.Generator().manual_seed(0))
    assert 0.4 <= draws["t"].min() and draws["t"].max() <= 0.6
    torch.nn.init.normal_(enh.head.denoiser.final_layer.linear.weight, std=0.1)
    loss = enh({"pixels": torch.rand(4, 3, 32, 32)}, {k: v[:4] for k, v in draws.items()})
    loss.mean().backward()
    assert loss.shape == (4,) and enh.head.denoiser.final_layer.linear.weight.grad.abs().sum() > 0


def test_shapes_the_network_cannot_take_are_config_errors_at_build(tiny_clip, overrides, tmp_path):
    with pytest.raises(ConfigError, match="divisible by the patch size 3"):  # a 16 x 16 latent in 3 x 3 patches
        build_enhancer(load_config(None, overrides(tiny_clip, tmp_path, model__denoiser_arch="{patch_size: 3}")))
    with pytest.raises(ConfigError, match="in_channels=12"):
        build_enhancer(load_config(None, overrides(tiny_clip, tmp_path, model__denoiser_arch="{in_channels: 64}")))
    with pytest.raises(ConfigError, match="set objective.timestep_sampling"):  # objective settings moved out
        build_enhancer(load_config(None, overrides(tiny_clip, tmp_path,
                                                   model__denoiser_arch="{timestep_sampling: uniform}")))
    with pytest.raises(ConfigError, match="did you mean 'patch_size'"):
        build_enhancer(load_config(None, overrides(tiny_clip, tmp_path, model__denoiser_arch="{patch_sise: 2}")))
    with pytest.raises(ValueError, match="sum\\(axes_dim\\)") as e:
        Flux(dataclasses.replace(DENOISERS["flux-tiny"].arch, in_channels=12, heads=8))
    assert not isinstance(e.value, ConfigError)  # the network itself knows nothing of configs
