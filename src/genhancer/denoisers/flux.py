"""Continuous denoiser: a lightweight FLUX-like rectified-flow transformer (MM-DiT + single-stream blocks).

Time convention (the authors' release and FLUX): ``x_t = (1 - t) x + t eps`` with t = 1 pure noise; the network
predicts the velocity ``eps - x``; sampling integrates the ODE from t = 1 down to t = 0 with Euler steps.
The condition enters twice, as in the release: the projected global token is added to the adaLN vector (through
``vector_in``), and all condition tokens, projected to the context width, form the context stream of the joint
attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..projector import Projector
from .base import GenerativeHead


@dataclass
class FluxArch:
    """Architecture and objective settings of the FLUX-like denoiser."""

    hidden: int = 3072
    heads: int = 24
    depth_double: int = 2  # n MM-DiT blocks
    depth_single: int | None = None  # single-stream blocks; None: 2 n (the paper)
    in_channels: int | None = None  # latent channels x patch^2; None: derived from the latent space
    patch_size: int = 2
    vec_dim: int = 768  # width of the projected global token fed to the adaLN vector
    ctx_dim: int = 4096  # width of the projected context tokens
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    guidance_embed: bool = True  # kept for parity with the release, which feeds a constant guidance
    guidance: float = 4.0
    axes_dim: tuple[int, int, int] = (16, 56, 56)  # RoPE dims over (context, row, column); sum = head dim
    theta: int = 10_000
    timestep_sampling: str = "logit-normal"  # copied from objective.* by the trainer
    logit_normal_scale: float = 1.0
    logit_normal_mean: float = 0.0
    grad_checkpointing: bool = False


PRESETS = {
    "flux-paper": FluxArch(in_channels=64),  # 1,310,154,816 parameters: the paper's lightweight denoiser
    "flux-n1": FluxArch(in_channels=64, depth_double=1),
    "flux-n3": FluxArch(in_channels=64, depth_double=3),
    "flux-n4": FluxArch(in_channels=64, depth_double=4),
    "flux-small": FluxArch(hidden=384, heads=6, vec_dim=256, ctx_dim=384, axes_dim=(8, 28, 28)),
    "flux-tiny": FluxArch(hidden=64, heads=4, depth_double=1, vec_dim=64, ctx_dim=64, axes_dim=(4, 6, 6),
                          guidance_embed=False),
}


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10_000, factor: float = 1000.0):
    """t: (B,) in [0, 1] -> sinusoidal features (B, dim); t is scaled by ``factor`` as in FLUX."""
    t = factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_frequencies(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """ids: (B, L, n_axes) positions -> rotation matrices (B, 1, L, head_dim // 2, 2, 2)."""
    out = []
    for i, d in enumerate(axes_dim):
        scale = torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d
        omega = 1.0 / theta**scale
        ang = ids[..., i].double()[..., None] * omega  # (B, L, d/2)
        out.append(torch.stack([ang.cos(), -ang.sin(), ang.sin(), ang.cos()], dim=-1))
    rot = torch.cat(out, dim=-2)
    return rearrange(rot, "b l d (i j) -> b 1 l d i j", i=2, j=2).float()


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x: (B, H, L, Dh) rotated pairwise by rot: (B, 1, L, Dh/2, 2, 2)."""
    xp = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = rot[..., 0] * xp[..., 0] + rot[..., 1] * xp[..., 1]
    return out.reshape(x.shape).type_as(x)


def attention(q, k, v, rot):
    """q, k, v: (B, H, L, Dh) -> (B, L, H * Dh), RoPE applied to q and k."""
    q, k = apply_rope(q, rot), apply_rope(k, rot)
    x = F.scaled_dot_product_attention(q, k, v)
    return rearrange(x, "b h l d -> b l (h d)")


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear embedding of a conditioning vector."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class QKNorm(nn.Module):
    """RMS normalisation of queries and keys per head, with learned scales."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.key_norm = nn.RMSNorm(head_dim, eps=1e-6)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class Modulation(nn.Module):
    """adaLN parameters (shift, scale, gate) x 1 or 2 from the conditioning vector."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: torch.Tensor):
        """vec: (B, D) -> tuple of (B, 1, D) chunks."""
        return self.lin(F.silu(vec))[:, None].chunk(self.multiplier, dim=-1)


def modulate(x, shift, scale):
    return (1 + scale) * x + shift


class StreamAttention(nn.Module):
    """QKV projection with QK-norm, and the output projection, of one stream."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        """x: (B, L, D) -> q, k, v: (B, H, L, Dh), q and k normalised."""
        q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b h l d", k=3, h=self.heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class DoubleStreamBlock(nn.Module):
    """MM-DiT block: image and context streams with their own weights, attending jointly."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(dim, double=True))
            setattr(self, f"{s}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_attn", StreamAttention(dim, heads, qkv_bias))
            setattr(self, f"{s}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_mlp", nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                                                    nn.Linear(hidden, dim)))

    def forward(self, img, txt, vec, rot):
        """img: (B, Li, D), txt: (B, Lt, D), vec: (B, D) -> updated (img, txt)."""
        im = self.img_mod(vec)
        tm = self.txt_mod(vec)
        qi, ki, vi = self.img_attn.qkv_heads(modulate(self.img_norm1(img), im[0], im[1]))
        qt, kt, vt = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), tm[0], tm[1]))
        a = attention(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2), rot)
        a_txt, a_img = a[:, : txt.shape[1]], a[:, txt.shape[1]:]
        img = img + im[2] * self.img_attn.proj(a_img)
        img = img + im[5] * self.img_mlp(modulate(self.img_norm2(img), im[3], im[4]))
        txt = txt + tm[2] * self.txt_attn.proj(a_txt)
        txt = txt + tm[5] * self.txt_mlp(modulate(self.txt_norm2(txt), tm[3], tm[4]))
        return img, txt


class SingleStreamBlock(nn.Module):
    """DiT block over the concatenated context + image sequence, attention and MLP in parallel."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads, self.mlp_hidden = heads, int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // heads)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x, vec, rot):
        """x: (B, L, D), vec: (B, D) -> (B, L, D)."""
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(modulate(self.pre_norm(x), shift, scale)),
                               [3 * x.shape[-1], self.mlp_hidden], dim=-1)
        q, k, v = rearrange(qkv, "b l (k h d) -> k b h l d", k=3, h=self.heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat([attention(q, k, v, rot), F.gelu(mlp, approximate="tanh")], -1))
        return x + gate * out


class LastLayer(nn.Module):
    """adaLN-modulated norm and the projection back to patch values."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Flux(nn.Module):
    """The FLUX-like transformer g_phi over patchified latents with a context stream."""

    def __init__(self, a: FluxArch):
        super().__init__()
        if a.hidden % a.heads or sum(a.axes_dim) != a.hidden // a.heads:
            raise ValueError(f"hidden {a.hidden} / heads {a.heads} must equal sum(axes_dim) {sum(a.axes_dim)}")
        self.arch = a
        depth_single = 2 * a.depth_double if a.depth_single is None else a.depth_single
        self.img_in = nn.Linear(a.in_channels, a.hidden)
        self.time_in = MLPEmbedder(256, a.hidden)
        self.vector_in = MLPEmbedder(a.vec_dim, a.hidden)
        self.guidance_in = MLPEmbedder(256, a.hidden) if a.guidance_embed else None
        self.txt_in = nn.Linear(a.ctx_dim, a.hidden)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(a.hidden, a.heads, a.mlp_ratio, a.qkv_bias) for _ in range(a.depth_double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(a.hidden, a.heads, a.mlp_ratio) for _ in range(depth_single))
        self.final_layer = LastLayer(a.hidden, a.in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier linears; adaLN modulations and the output layer zeroed, so every block starts as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Modulation):
                nn.init.zeros_(m.lin.weight), nn.init.zeros_(m.lin.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, img, img_ids, txt, txt_ids, t, vec_cond):
        """img: (B, Li, in_channels), img_ids: (B, Li, 3), txt: (B, Lt, ctx_dim), txt_ids: (B, Lt, 3),
        t: (B,), vec_cond: (B, vec_dim) -> velocity (B, Li, in_channels)."""
        a = self.arch
        vec = self.time_in(timestep_embedding(t).to(img.dtype)) + self.vector_in(vec_cond)
        if self.guidance_in is not None:
            g = torch.full_like(t, a.guidance)
            vec = vec + self.guidance_in(timestep_embedding(g).to(img.dtype))
        img, txt = self.img_in(img), self.txt_in(txt)
        rot = rope_frequencies(torch.cat([txt_ids, img_ids], dim=1), a.axes_dim, a.theta)
        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, rot)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = self._run(block, x, vec, rot)
        return self.final_layer(x[:, txt.shape[1]:], vec)

    def _run(self, block, *args):
        if self.arch.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


class FlowHead(GenerativeHead):
    """Projectors h_omega (to the adaLN vector and to context tokens) + the FLUX-like rectified-flow denoiser."""

    latent_kind = "continuous"

    def __init__(self, arch: FluxArch, cond_dim: int):
        super().__init__()
        self.arch = arch
        self.proj_vec = Projector(cond_dim, arch.vec_dim)
        self.proj_ctx = Projector(cond_dim, arch.ctx_dim)
        self.denoiser = Flux(arch)

    def draw(self, n, target_shape, generator, device="cpu"):
        noise = torch.randn((n, *target_shape), generator=generator)
        if self.arch.timestep_sampling == "uniform":
            t = torch.rand(n, generator=generator)
        else:
            eps = torch.randn(n, generator=generator)
            t = torch.sigmoid(self.arch.logit_normal_mean + self.arch.logit_normal_scale * eps)
        return {"noise": noise.to(device), "t": t.to(device)}

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_t: (B, C, H, W), t: (B,), cond: (B, L, D) -> predicted velocity (B, C, H, W)."""
        p = self.arch.patch_size
        b, _, h, w = x_t.shape
        img = rearrange(x_t, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=p, pw=p)
        hp, wp = h // p, w // p
        img_ids = torch.zeros(hp, wp, 3, device=x_t.device)
        img_ids[..., 1] = torch.arange(hp, device=x_t.device)[:, None]
        img_ids[..., 2] = torch.arange(wp, device=x_t.device)[None, :]
        img_ids = img_ids.reshape(1, hp * wp, 3).expand(b, -1, -1)
        txt = self.proj_ctx(cond)
        txt_ids = torch.zeros(b, txt.shape[1], 3, device=x_t.device)
        out = self.denoiser(img, img_ids, txt, txt_ids, t, self.proj_vec(cond[:, 0]))
        return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=hp, w=wp, ph=p, pw=p)

    def loss(self, target, cond, draws):
        noise, t = draws["noise"].to(target.dtype), draws["t"].to(target.dtype)
        tb = t.view(-1, *([1] * (target.ndim - 1)))
        x_t = (1 - tb) * target + tb * noise
        pred = self.velocity(x_t, t, cond)
        return (pred.float() - (noise - target).float()).pow(2).flatten(1).mean(1)

    @torch.no_grad()
    def sample(self, cond, target_shape, generator, steps=25):
        x = torch.randn((cond.shape[0], *target_shape), generator=generator).to(cond.device, cond.dtype)
        ts = torch.linspace(1.0, 0.0, steps + 1, device=cond.device)
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            v = self.velocity(x, t_cur.expand(x.shape[0]).to(x.dtype), cond)
            x = x + (t_next - t_cur) * v
        return x


def build(arch: FluxArch, cond_dim: int, latent) -> FlowHead:
    """The head for condition width ``cond_dim`` over a continuous ``latent`` space."""
    from dataclasses import replace

    channels = latent.channels * arch.patch_size**2
    if arch.in_channels is None:
        arch = replace(arch, in_channels=channels)
    elif arch.in_channels != channels:
        from ..config import ConfigError

        raise ConfigError(f"denoiser expects {arch.in_channels} input channels but the latent space gives "
                          f"{latent.channels} x {arch.patch_size}^2 = {channels}: set "
                          f"model.denoiser_arch.in_channels={channels} or use a matching latent")
    return FlowHead(arch, cond_dim)
