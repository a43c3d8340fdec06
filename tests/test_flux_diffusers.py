"""Our FLUX-like denoiser is the function of diffusers' ``FluxTransformer2DModel`` (the reference the denoiser
benchmark times it against), parameter for parameter."""

import dataclasses

import pytest
import torch

from genhancer.denoisers import DENOISERS
from genhancer.denoisers.flux import Flux
from genhancer.denoisers.flux_diffusers import diffusers_call, diffusers_config, to_diffusers

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    arch = dataclasses.replace(DENOISERS["flux-tiny"].arch, in_channels=12, depth_double=2, depth_single=2,
                               guidance_embed=True)
    ours = Flux(arch)
    with torch.no_grad():  # the zero-initialised modulations would hide most of the network
        for p in ours.parameters():
            p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(3, 16, 12, generator=g), torch.randint(0, 4, (16, 3), generator=g).float(),
              torch.randn(3, 5, 64, generator=g), torch.zeros(5, 3), torch.rand(3, generator=g),
              torch.randn(3, 64, generator=g))
    return ours, to_diffusers(ours), inputs


def test_weights_copied_into_diffusers_give_our_outputs(pair):
    ours, reference, inputs = pair
    with torch.no_grad():
        expected = diffusers_call(reference, *inputs, ours.arch.guidance)
        torch.testing.assert_close(ours(*inputs), expected, atol=1e-5, rtol=1e-5)
        with torch.enable_grad():
            torch.testing.assert_close(ours(*inputs), expected, atol=1e-5, rtol=1e-5)  # the training path too


def test_under_bf16_autocast_we_stay_closer_to_fp32_than_diffusers(pair):
    """diffusers rounds the timestep (times 1000) to bf16 before its sinusoidal features; we do not."""
    ours, reference, inputs = pair
    with torch.no_grad():
        fp32 = ours(*inputs)
        with torch.autocast("cpu", torch.bfloat16):
            ours_bf16 = ours(*inputs).float()
            theirs_bf16 = diffusers_call(reference, *inputs, ours.arch.guidance).float()
    assert (ours_bf16 - fp32).norm() < (theirs_bf16 - fp32).norm()


def test_the_paper_preset_has_diffusers_parameter_count():
    with torch.device("meta"):
        ours = Flux(DENOISERS["flux-paper"].arch)
        theirs = diffusers.FluxTransformer2DModel(**diffusers_config(ours.arch))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 1_310_154_816
