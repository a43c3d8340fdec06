"""Continuous denoiser network: a lightweight FLUX-like transformer (MM-DiT + single-stream blocks), g_phi.

It maps patch tokens of a noisy latent, their RoPE positions, the context tokens and the time to a velocity per
patch token (``genhancer.objectives.flow`` patchifies, draws, and integrates). The condition enters twice, as in
the authors' release: the projected global token is added to the adaLN vector (through ``vector_in``), and all
condition tokens, projected to the context width, form the context ("txt") stream of the joint attention.
Block layout and parameter names follow black-forest-labs/flux (``modules/layers.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..projector import Projector
from .base import run_block
from .layers import attention, feed_forward, linear_blocks, mlp_chunks, rope_table, row_blocks, row_chunks


@dataclass(frozen=True)
class FluxArch:
    """Architecture of the FLUX-like denoiser (presets: ``configs/denoisers/flux-*.json``)."""

    hidden: int
    heads: int
    depth_double: int  # n MM-DiT blocks
    depth_single: int | None  # single-stream blocks; None: 2 n (the paper)
    in_channels: int | None  # latent channels x patch^2; None: derived from the latent space
    patch_size: int
    vec_dim: int  # width of the projected global token fed to the adaLN vector
    ctx_dim: int  # width of the projected context tokens
    mlp_ratio: float
    qkv_bias: bool
    guidance_embed: bool  # kept for parity with the release, which feeds a constant guidance
    guidance: float
    axes_dim: tuple[int, int, int]  # RoPE dims over (context, row, column); sum = head dim
    theta: int


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10_000, factor: float = 1000.0):
    """t: (B,) in [0, 1] -> sinusoidal features (B, dim); t is scaled by ``factor`` as in FLUX."""
    t = factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear embedding of a conditioning vector."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class QKNorm(nn.Module):
    """RMS normalisation of queries and keys per head, with learned scales (applied in :func:`attention`)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.key_norm = nn.RMSNorm(head_dim, eps=1e-6)

    def scales(self) -> torch.Tensor:
        """(2, 1, Dh): the q and k scales, broadcast over the heads."""
        return torch.stack([self.query_norm.weight, self.key_norm.weight])[:, None]


class ModulationOut(NamedTuple):
    """One adaLN modulation: ``(1 + scale) * norm(x) + shift`` in, ``x + gate * f(...)`` out; each (B, 1, D)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    """The adaLN modulation(s) of a block from the conditioning vector: two (attention, MLP) or one."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec_act: torch.Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        """vec_act: silu(vec), (B, D), computed once for all blocks -> (attention modulation, MLP one or None)."""
        out = self.lin(vec_act)[:, None].chunk(self.multiplier, dim=-1)  # multiplier x (B, 1, D)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def modulate(x: torch.Tensor, mod: ModulationOut) -> torch.Tensor:
    """(1 + scale) * x + shift in one kernel over x."""
    return torch.addcmul(mod.shift, x, 1 + mod.scale)


def gated(x: torch.Tensor, mod: ModulationOut, out: torch.Tensor) -> torch.Tensor:
    """x + gate * out in one kernel."""
    return torch.addcmul(x, mod.gate, out)


class SelfAttention(nn.Module):
    """QKV projection (fused) with QK-norm, and the output projection, of one stream."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def heads_qk_v(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, L, D) -> q and k stacked, (B, L, 2, H, Dh), not yet normalised; v, (B, L, H, Dh)."""
        qk, v = linear_blocks(x, self.qkv, [2 * x.shape[-1], x.shape[-1]])  # (B, L, 2D), (B, L, D)
        return qk.unflatten(-1, (2, self.heads, -1)), v.unflatten(-1, (self.heads, -1))


def mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def norm(dim: int) -> nn.LayerNorm:
    """LayerNorm without affine parameters: the adaLN modulation supplies scale and shift."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class DoubleStreamBlock(nn.Module):
    """MM-DiT block: image and context ("txt") streams with their own weights, attending jointly."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        # Registration order (image stream, then context stream) fixes the initialisation's random stream.
        self.img_mod = Modulation(dim, double=True)
        self.img_norm1 = norm(dim)
        self.img_attn = SelfAttention(dim, heads, qkv_bias)
        self.img_norm2 = norm(dim)
        self.img_mlp = mlp(dim, mlp_ratio)

        self.txt_mod = Modulation(dim, double=True)
        self.txt_norm1 = norm(dim)
        self.txt_attn = SelfAttention(dim, heads, qkv_bias)
        self.txt_norm2 = norm(dim)
        self.txt_mlp = mlp(dim, mlp_ratio)

    def forward(self, img, txt, vec_act, table):
        """img: (B, Li, D), txt: (B, Lt, D), vec_act: silu(vec) (B, D), table: RoPE of [txt; img]
        -> updated (img, txt)."""
        img_mod1, img_mod2 = self.img_mod(vec_act)  # (B, 1, D) each
        txt_mod1, txt_mod2 = self.txt_mod(vec_act)
        img_attn, txt_attn = self.attend(modulate(self.img_norm1(img), img_mod1),
                                         modulate(self.txt_norm1(txt), txt_mod1), table)  # (B, Li, D), (B, Lt, D)

        img = gated(img, img_mod1, img_attn)  # (B, Li, D)
        img = gated(img, img_mod2, feed_forward(self.img_mlp, modulate(self.img_norm2(img), img_mod2)))
        txt = gated(txt, txt_mod1, txt_attn)  # (B, Lt, D)
        txt = gated(txt, txt_mod2, feed_forward(self.txt_mlp, modulate(self.txt_norm2(txt), txt_mod2)))
        return img, txt

    def attend(self, img, txt, table):
        """Joint attention over the context tokens followed by the image tokens, projected back per stream:
        (B, Li, D), (B, Lt, D) -> the same shapes. Every position gets its own stream's q / k scales. (A method,
        so that its buffers are released when it returns.)"""
        n_txt, n_img = txt.shape[1], img.shape[1]
        (txt_qk, txt_v), (img_qk, img_v) = self.txt_attn.heads_qk_v(txt), self.img_attn.heads_qk_v(img)
        qk, v = torch.cat([txt_qk, img_qk], dim=1), torch.cat([txt_v, img_v], dim=1)  # (B, Lt + Li, [2,] H, Dh)
        qk_scale = torch.cat([self.txt_attn.norm.scales().expand(n_txt, -1, -1, -1),
                              self.img_attn.norm.scales().expand(n_img, -1, -1, -1)])  # (Lt + Li, 2, 1, Dh)
        txt_attn, img_attn = attention(qk, v, qk_scale, table).split([n_txt, n_img], dim=1)  # (B, Lt|Li, D)
        return self.img_attn.proj(img_attn), self.txt_attn.proj(txt_attn)


class SingleStreamBlock(nn.Module):
    """DiT block over the concatenated context + image sequence, attention and MLP in parallel (one linear in,
    one linear out)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads, self.mlp_hidden = heads, int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)  # qkv and MLP input
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)  # attention output and MLP output
        self.norm = QKNorm(dim // heads)
        self.pre_norm = norm(dim)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x, vec_act, table):
        """x: (B, L, D), vec_act: silu(vec) (B, D), table: RoPE of x -> (B, L, D)."""
        mod, _ = self.modulation(vec_act)  # (B, 1, D) each
        h = modulate(self.pre_norm(x), mod)  # (B, L, D)
        D = h.shape[-1]
        if torch.is_grad_enabled():  # backward keeps every activation anyway
            qk, v, mlp_in = linear_blocks(h, self.linear1, [2 * D, D, self.mlp_hidden])
            attn = attention(qk.unflatten(-1, (2, self.heads, -1)), v.unflatten(-1, (self.heads, -1)),
                             self.norm.scales(), table)  # (B, L, D)
            out = self.linear2(torch.cat([attn, F.gelu(mlp_in, approximate="tanh")], dim=-1))  # (B, L, D)
            return gated(x, mod, out)
        # Forward only: q, k, v from linear1's first rows, then the MLP input, its activation, the concatenation
        # and linear2 over slices of the tokens (no (B, L, M) buffer), q, k, v released before.
        (w_qk, b_qk), (w_v, b_v), (w_mlp, b_mlp) = row_blocks(self.linear1, [2 * D, D, self.mlp_hidden])
        attn = attention(F.linear(h, w_qk, b_qk).unflatten(-1, (2, self.heads, -1)),
                         F.linear(h, w_v, b_v).unflatten(-1, (self.heads, -1)), self.norm.scales(), table)
        chunks = mlp_chunks(h)
        out = torch.cat([self.linear2(torch.cat([a, F.gelu(F.linear(rows, w_mlp, b_mlp), approximate="tanh")], -1))
                         for rows, a in zip(row_chunks(h, chunks), row_chunks(attn, chunks))])  # (B * L, D)
        return gated(x, mod, out.view_as(h))


class LastLayer(nn.Module):
    """adaLN-modulated norm and the projection back to patch values."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = norm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, vec_act):
        """x: (B, L, D), vec_act: silu(vec) (B, D) -> (B, L, out_dim)."""
        shift, scale = self.adaLN_modulation[1](vec_act)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(torch.addcmul(shift, self.norm_final(x), 1 + scale))  # (B, L, out_dim)


class Flux(nn.Module):
    """The FLUX-like transformer g_phi over patch tokens with a context stream."""

    def __init__(self, a: FluxArch):
        super().__init__()
        if a.hidden % a.heads or sum(a.axes_dim) != a.hidden // a.heads:
            raise ValueError(f"hidden {a.hidden} / heads {a.heads} must equal sum(axes_dim) {sum(a.axes_dim)}")
        self.arch = a
        self.grad_checkpointing = False  # recompute every block in backward; set by genhancer.enhancer
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
        """Xavier linears; adaLN modulations and the output layer zeroed, so every block starts as the identity.

        A choice of this implementation (DiT's adaLN-Zero), not taken from the authors' release: the untrained
        denoiser predicts exactly 0, so the first steps train the output layer and the gates open gradually instead
        of starting from a random velocity field. Linear layers are initialised in registration order, which is
        why the blocks register their sub-modules in a fixed order (same seed, same weights).
        """
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
        """img: (B, Li, in_channels) patch tokens, img_ids: (Li, 3), txt: (B, Lt, ctx_dim), txt_ids: (Lt, 3),
        t: (B,), vec_cond: (B, vec_dim) -> velocity (B, Li, in_channels). Positions are shared by the batch."""
        a = self.arch
        # The sinusoidal features stay float32 up to the first linear (autocast rounds there, not before).
        vec = self.time_in(timestep_embedding(t).to(img.dtype))  # (B, D)
        vec = vec + self.vector_in(vec_cond)  # (B, D)
        if self.guidance_in is not None:
            g = torch.full_like(t, a.guidance)  # (B,)
            vec = vec + self.guidance_in(timestep_embedding(g).to(img.dtype))  # (B, D)
        vec_act = F.silu(vec)  # (B, D): every modulation reads silu(vec)
        img, txt = self.img_in(img), self.txt_in(txt)  # (B, Li, D), (B, Lt, D)
        table = rope_table(torch.cat([txt_ids, img_ids]), a.axes_dim, a.theta)[:, None, None]  # (Lt + Li, 1, 1, Dh/2)
        for block in self.double_blocks:
            img, txt = run_block(block, self.grad_checkpointing, img, txt, vec_act, table)  # (B, Li, D), (B, Lt, D)
        n_txt, x = txt.shape[1], torch.cat([txt, img], dim=1)  # (B, Lt + Li, D)
        del img, txt  # nothing saves them: released for the single blocks' activations
        for block in self.single_blocks:
            x = run_block(block, self.grad_checkpointing, x, vec_act, table)  # (B, Lt + Li, D)
        return self.final_layer(x[:, n_txt:], vec_act)  # (B, Li, in_channels)


class FluxHead(nn.Module):
    """Projectors h_omega (to the adaLN vector and to the context tokens) + the network g_phi."""

    def __init__(self, arch: FluxArch, cond_dim: int):
        super().__init__()
        self.arch = arch
        self.proj_vec = Projector(cond_dim, arch.vec_dim)
        self.proj_ctx = Projector(cond_dim, arch.ctx_dim)
        self.denoiser = Flux(arch)

    @property
    def patch_size(self) -> int:
        return self.arch.patch_size

    def check_target(self, target_shape: tuple[int, ...]) -> None:
        """target_shape: (C, H, W) of a latent; its sides must be whole patches."""
        p = self.arch.patch_size
        if len(target_shape) != 3 or target_shape[1] % p or target_shape[2] % p:
            raise ValueError(f"a (C, H, W) latent with sides divisible by the patch size {p} is needed, got "
                             f"{tuple(target_shape)}: set model.denoiser_arch.patch_size or use another latent")

    def forward(self, img, img_ids, cond, txt_ids, t):
        """img: (B, Li, in_channels) patch tokens; img_ids: (Li, 3); cond: (B, L, D_c) condition tokens;
        txt_ids: (L, 3); t: (B,) -> velocity (B, Li, in_channels)."""
        return self.denoiser(img, img_ids, self.proj_ctx(cond), txt_ids, t, self.proj_vec(cond[:, 0]))


ARCH, LATENT_KIND = FluxArch, "continuous"


def build(arch: FluxArch, cond_dim: int, latent) -> FluxHead:
    """The head for condition width ``cond_dim`` over a continuous ``latent`` space (reads ``latent.channels``)."""
    channels = latent.channels * arch.patch_size**2
    if arch.in_channels is None:
        arch = replace(arch, in_channels=channels)
    elif arch.in_channels != channels:
        raise ValueError(f"denoiser expects {arch.in_channels} input channels but the latent space gives "
                         f"{latent.channels} x {arch.patch_size}^2 = {channels}: set "
                         f"model.denoiser_arch.in_channels={channels} or use a matching latent")
    return FluxHead(arch, cond_dim)
