"""The optimised denoisers compute what the implementation before issue 15 computed: outputs and gradients on
``fixtures/denoiser_reference.safetensors`` (written by ``fixtures/make_denoiser_reference.py`` at commit
853594a), in fp32 and under bf16 autocast, from the same state dict loaded strictly."""

import json
from pathlib import Path

import pytest
import torch
from float32 import assert_close, relative_error
from safetensors import safe_open

from genhancer.config import ObjectiveConfig
from genhancer.denoisers import flux, layers
from genhancer.enhancer import build_head
from genhancer.latents import PixelSpace
from genhancer.objectives import RectifiedFlow

FIXTURE = Path(__file__).parent / "fixtures" / "denoiser_reference.safetensors"
# fp32: the same float32 function, reassociated, on this machine's kernels (tests/float32.py). bf16: each
# implementation rounds at its own places, so its result is compared with the float32 reference: its error may be
# at most BF16_SLACK times the reference's own bf16 error (both measured as ||x - x_fp32|| / ||x_fp32|| per
# tensor; measured: at most 2.2x on gradients, 1.0x on outputs). A wrong rotation, scale or modulation gives errors
# of order 1.
BF16_SLACK = 3.0


@pytest.fixture(scope="module")
def ref():
    with safe_open(FIXTURE, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


class _VQStub:
    kind = "discrete"

    def __init__(self, codes):
        self.codebook_size = codes


def _head(tensors, meta, family):
    arch = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(meta[f"{family}_arch"]).items()}
    latent = PixelSpace(2) if family == "flux" else _VQStub(int(meta["codes"]))
    head = build_head(f"{family}-tiny", arch, int(meta["cond_dim"]), latent)
    prefix = f"{family}.state."
    head.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    return head


def _check(t, key, got, precision):
    """``got`` against the fixture ``<family>.<precision>.<what>`` (key = (family, what))."""
    family, what = key
    expected = t[f"{family}.{precision}.{what}"]
    if precision == "fp32":
        assert_close(got, expected, what)
        return
    fp32 = t[f"{family}.fp32.{what}"]
    error = lambda x: relative_error(x, fp32)
    assert error(got) <= BF16_SLACK * error(expected) + 1e-3, f"{what}: {error(got):.4f} vs {error(expected):.4f}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_flux_outputs_and_gradients_match_the_reference(ref, precision):
    t, meta = ref
    head = _head(t, meta, "flux")
    x_t, cond = t["flux.x_t"].clone().requires_grad_(), t["flux.cond"].clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        v = RectifiedFlow(ObjectiveConfig()).velocity(head, x_t, t["flux.t"], cond)
    (v.float() * t["flux.weight"]).sum().backward()
    _check(t, ("flux", "velocity"), v.float().detach(), precision)
    _check(t, ("flux", "grad.x_t"), x_t.grad, precision)
    _check(t, ("flux", "grad.cond"), cond.grad, precision)
    for name, param in head.named_parameters():
        _check(t, ("flux", f"grad.{name}"), param.grad, precision)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):  # the lean path
        v = RectifiedFlow(ObjectiveConfig()).velocity(head, x_t, t["flux.t"], cond)
    _check(t, ("flux", "velocity"), v.float(), precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_perceiver_outputs_and_gradients_match_the_reference(ref, precision):
    t, meta = ref
    head = _head(t, meta, "perceiver")
    cond = t["perceiver.cond"].clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        logits = head(t["perceiver.tokens"], t["perceiver.masked"], cond)
    (logits.float() * t["perceiver.weight"]).sum().backward()
    _check(t, ("perceiver", "logits"), logits.float().detach(), precision)
    _check(t, ("perceiver", "grad.cond"), cond.grad, precision)
    for name, param in head.named_parameters():
        _check(t, ("perceiver", f"grad.{name}"), param.grad, precision)


def test_the_rope_table_is_built_once_per_forward_without_a_batch_dimension(ref, monkeypatch):
    t, meta = ref
    head = _head(t, meta, "flux")
    tables = []

    def recording(*args):
        tables.append(flux_rope_table(*args))
        return tables[-1]

    flux_rope_table = flux.rope_table
    monkeypatch.setattr(flux, "rope_table", recording)
    x_t = t["flux.x_t"]  # (3, 3, 8, 12): 4 x 6 patches, 5 context tokens
    RectifiedFlow(ObjectiveConfig()).velocity(head, x_t, t["flux.t"], t["flux.cond"])
    head_dim = head.arch.hidden // head.arch.heads
    assert len(tables) == 1 and tables[0].shape == (5 + 4 * 6, head_dim // 2)
    assert tables[0].dtype == torch.complex64


def test_the_single_block_keeps_no_fused_buffer_alive_without_grad():
    """Forward only, the (B, L, 3D + M) projection, the (B, L, D + M) concatenation and the whole (B, L, M) MLP
    hidden state never exist: no tensor the block's ops produce is larger than the q and k projection (B, L, 2D)."""
    block = flux.SingleStreamBlock(dim=16, heads=2, mlp_ratio=4.0)
    x, vec = torch.randn(2, 48, 16), torch.randn(2, 16)  # 96 rows: the MLP runs over 4 slices of 24
    table = layers.rope_table(torch.zeros(48, 3), (2, 2, 4), 10_000)[:, None, None]
    sizes = []

    class Sizes(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and not func.is_view:  # new storage only
                sizes.append(out.numel())
            return out

    with torch.no_grad(), Sizes():
        lean = block(x, vec, table)
    assert max(sizes) == 2 * 48 * 2 * 16  # (B, L, 2D)
    torch.testing.assert_close(lean, block(x, vec, table))  # the training path computes the same


def test_linear_blocks_equal_the_split_linear_with_gradients():
    linear = torch.nn.Linear(8, 12)
    x = torch.randn(3, 5, 8, requires_grad=True)
    weights = torch.randn(3, 5, 12)
    (torch.cat(layers.linear_blocks(x, linear, [4, 2, 6]), -1) * weights).sum().backward()
    grads = x.grad, linear.weight.grad, linear.bias.grad
    x.grad = linear.weight.grad = linear.bias.grad = None
    (linear(x) * weights).sum().backward()
    for got, expected in zip(grads, (x.grad, linear.weight.grad, linear.bias.grad)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("per_position", [False, True], ids=["one scale", "a scale per position"])
def test_forward_only_attention_under_bf16_equals_the_training_path(per_position):
    """Without gradients under autocast, q and k are normalised one after the other (half the float32 buffer):
    the same values, bit for bit, as the training path's one pass over both."""
    g = torch.Generator().manual_seed(0)
    B, L, H, Dh = 2, 10, 4, 16
    qk, v = torch.randn(B, L, 2, H, Dh, generator=g).bfloat16(), torch.randn(B, L, H, Dh, generator=g).bfloat16()
    scale = torch.rand(*((L,) if per_position else ()), 2, 1, Dh, generator=g) + 0.5
    ids = torch.stack([torch.zeros(L), torch.arange(L), torch.arange(L)], dim=-1)
    table = layers.rope_table(ids, (4, 6, 6), 10_000).view(L, 1, 1, Dh // 2)
    with torch.no_grad():
        forward_only = layers.attention(qk, v, scale, table)
    training = layers.attention(qk, v, scale, table)  # grad mode on: NormRope
    assert forward_only.dtype == training.dtype == torch.bfloat16 and torch.equal(forward_only, training)
