"""Checkpoints and random streams of the code before the objective / network split (commit 26842f7) still hold:
``fixtures/legacy_heads.safetensors`` (written by ``fixtures/make_legacy_heads.py`` at that commit) loads under the
same tensor names and gives the same draws, losses, network outputs, samples and initialisation."""

import json
from pathlib import Path

import pytest
import torch
from float32 import assert_close
from safetensors import safe_open

from genhancer.config import ObjectiveConfig
from genhancer.enhancer import build_head
from genhancer.latents import PixelSpace
from genhancer.objectives import MaskedTokens, RectifiedFlow

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_heads.safetensors"


@pytest.fixture(scope="module")
def legacy():
    with safe_open(FIXTURE, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _arch(meta, key):
    arch = json.loads(meta[key])
    return {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}


class _VQStub:
    kind, codebook_size = "discrete", 16


LEGACY = 5e-5  # relative: ten times what another CPU's kernels change here (float32.py), a sixteenth of a fault's


def _loaded(tensors, prefix, head):
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    assert set(state) == set(head.state_dict())  # the checkpoint names ("head.<name>") are unchanged
    head.load_state_dict(state, strict=True)
    return head


def test_flow_head_matches_the_legacy_code(legacy):
    t, meta = legacy
    head = _loaded(t, "flux.state.", build_head("flux-tiny", _arch(meta, "flux_arch"), int(meta["cond_dim"]),
                                                PixelSpace(2)))
    flow = RectifiedFlow(ObjectiveConfig())
    draws = flow.draw(3, (3, 8, 8), torch.Generator().manual_seed(5))
    assert torch.equal(draws["noise"], t["flux.noise"]) and torch.equal(draws["t"], t["flux.t"])
    uniform = RectifiedFlow(ObjectiveConfig(timestep_sampling="uniform"))
    assert torch.equal(uniform.draw(3, (3, 8, 8), torch.Generator().manual_seed(5))["t"], t["flux.t_uniform"])
    x, cond = t["flux.target"], t["flux.cond"]
    tb = draws["t"].view(-1, 1, 1, 1)
    with torch.no_grad():
        assert_close(flow.loss(head, x, cond, draws), t["flux.loss"], "loss", LEGACY)
        v = flow.velocity(head, (1 - tb) * x + tb * draws["noise"], draws["t"], cond)
    assert_close(v, t["flux.velocity"], "velocity", LEGACY)
    sample = flow.sample(head, cond, (3, 8, 8), torch.Generator().manual_seed(6), steps=3)
    assert_close(sample, t["flux.sample"], "sample", LEGACY)


def test_masked_head_matches_the_legacy_code(legacy):
    t, meta = legacy
    head = _loaded(t, "perceiver.state.", build_head("perceiver-tiny", _arch(meta, "perceiver_arch"),
                                                     int(meta["cond_dim"]), _VQStub()))
    masked = MaskedTokens(ObjectiveConfig())
    mask = masked.draw(3, (4, 4), torch.Generator().manual_seed(5))["mask"]
    assert torch.equal(mask, t["perceiver.mask"])
    fixed = MaskedTokens(ObjectiveConfig(mask_ratio=0.3)).draw(3, (4, 4), torch.Generator().manual_seed(5))["mask"]
    assert torch.equal(fixed, t["perceiver.mask_fixed"])
    tokens, cond = t["perceiver.target"], t["perceiver.cond"]
    with torch.no_grad():
        assert_close(masked.loss(head, tokens, cond, {"mask": mask}), t["perceiver.loss"], "loss", LEGACY)
        assert_close(head(tokens, mask, cond), t["perceiver.logits"], "logits", LEGACY)
    sample = masked.sample(head, cond, (4, 4), torch.Generator().manual_seed(6), steps=3)
    assert torch.equal(sample, t["perceiver.sample"])


@pytest.mark.parametrize("name, latent", [("flux-tiny", PixelSpace(2)), ("perceiver-tiny", _VQStub())])
def test_a_seed_gives_the_legacy_initial_weights(legacy, name, latent):
    t, meta = legacy
    torch.manual_seed(0)
    head = build_head(name, None, int(meta["cond_dim"]), latent)
    sums = torch.stack([v.double().sum() for v in head.state_dict().values()])
    torch.testing.assert_close(sums, t[f"{name.split('-')[0]}.init_checksums"], atol=1e-9, rtol=0)
