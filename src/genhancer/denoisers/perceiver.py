"""Discrete denoiser network: a lightweight Perceiver g_phi that predicts VQ-GAN codes from the encoder's condition.

Paper (Sec. 4.4, Algorithm 2, Eq. 4): queries are the unmasked tokens' embeddings, keys / values the concatenation
of those embeddings and the projected condition ``h_omega(v_theta(x))``; the cross-attention output conditions an
L-layer transformer that predicts the codebook index of every masked position. What is masked, the loss and the
iterative decoding are the objective's (``genhancer.objectives.masked``).

Choices where the paper is silent, taken from masked-token models (MaskGIT, MAGE):

* Token embeddings are learned (one row per code, as in MaskGIT / MAGE), not the VQ-GAN's frozen codebook vectors,
  so the head needs nothing from the tokenizer but its codebook size.
* Learned 2-D position embeddings (a ``max_grid x max_grid`` table, the top-left ``h x w`` corner used) are added
  to the token embeddings before the cross-attention, so unmasked queries know where they are.
* The L-layer stack sees every position (MAGE's decoder): unmasked positions carry the cross-attention output,
  masked ones a learned [MASK] embedding plus their position embedding.
* One learned buffer query (MAGE's always-unmasked buffer token) joins the unmasked queries and its cross-attention
  output is prepended to the stack. Without it nothing would carry the condition when every token is masked, which
  is where iterative decoding starts.
* Condition tokens: all ``L_c`` tokens of ``cond: (B, L_c, D_c)`` go through the projector and join the keys /
  values, so ``cls`` (L_c = 1) and ``cls+local`` use the same code.
* Widths: 768 wide, 12 heads, MLP ratio 4 (MaskGIT's base width); depth is the preset (paper default L = 6,
  Table 5 ablates 2 / 4 / 6 / 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..projector import Projector
from .base import run_block


@dataclass(frozen=True)
class PerceiverArch:
    """Architecture of the discrete denoiser (presets: ``configs/denoisers/perceiver-*.json``)."""

    depth: int  # L transformer layers after the cross-attention (paper: 6)
    width: int
    heads: int
    mlp_ratio: float
    max_grid: int  # side of the learned position table: latent grids up to max_grid x max_grid
    codebook_size: int | None  # None: the latent space's; set to pin it (a mismatch is an error)


class Attention(nn.Module):
    """Multi-head attention of queries ``x`` over a key / value sequence ``ctx`` (self-attention when ctx is x)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, Lq, D); ctx: (B, Lk, D); mask: (B, 1, Lq, Lk) bool, True = may attend -> (B, Lq, D)."""
        B, Lq, D = x.shape
        q = self.q(x).view(B, Lq, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, Lq, D))


class MLP(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CrossAttentionBlock(nn.Module):
    """Perceiver cross-attend block: queries attend over [unmasked tokens; condition tokens], then an MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q: (B, Lq, D); kv: (B, Lk, D); mask: (B, 1, Lq, Lk) -> (B, Lq, D)."""
        q = q + self.attn(self.norm_q(q), self.norm_kv(kv), mask)
        return q + self.mlp(self.norm_mlp(q))


class Block(nn.Module):
    """Pre-norm transformer layer: self-attention + MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        h = self.norm1(x)
        x = x + self.attn(h, h)
        return x + self.mlp(self.norm2(x))


class Perceiver(nn.Module):
    """g_phi: code indices of the unmasked positions + projected condition -> logits over the codebook everywhere."""

    def __init__(self, arch: PerceiverArch, codebook_size: int):
        super().__init__()
        D = arch.width
        self.max_grid = arch.max_grid
        self.codebook_size = codebook_size
        self.grad_checkpointing = False  # recompute the L layers in backward; set by genhancer.enhancer
        self.tok_emb = nn.Embedding(codebook_size, D)
        self.pos_emb = nn.Parameter(torch.zeros(arch.max_grid, arch.max_grid, D))
        self.mask_emb = nn.Parameter(torch.zeros(D))
        self.buffer = nn.Parameter(torch.zeros(D))
        self.cross = CrossAttentionBlock(D, arch.heads, arch.mlp_ratio)
        self.blocks = nn.ModuleList(Block(D, arch.heads, arch.mlp_ratio) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(D)
        self.logits = nn.Linear(D, codebook_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)
        for p in (self.pos_emb, self.mask_emb, self.buffer):
            nn.init.trunc_normal_(p, std=0.02)
        # Zero logits: training starts from the uniform prediction, loss = log(codebook_size) on every sample.
        nn.init.zeros_(self.logits.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights of a network of another codebook or position table (stage-2 init_from, resume) fail by name
        # instead of as a size mismatch deep inside torch.
        saved = state_dict.get(prefix + "logits.bias")
        if saved is not None and saved.shape[0] != self.codebook_size:
            raise ValueError(f"the saved discrete denoiser predicts {saved.shape[0]} codes but the VQ tokenizer has "
                             f"{self.codebook_size}: set model.latent_path to the VQ model the head was trained with")
        saved = state_dict.get(prefix + "pos_emb")
        if saved is not None and saved.shape[0] != self.max_grid:
            raise ValueError(f"the saved discrete denoiser has a {saved.shape[0]}x{saved.shape[0]} position table: "
                             f"set model.denoiser_arch.max_grid={saved.shape[0]}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_grid(self, h: int, w: int) -> None:
        if h > self.max_grid or w > self.max_grid:
            raise ValueError(f"latent grid {h}x{w} exceeds the discrete denoiser's position table "
                             f"{self.max_grid}x{self.max_grid}: set model.denoiser_arch.max_grid={max(h, w)}")

    def forward(self, tokens: torch.Tensor, masked: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens: (B, h, w) long (values at masked positions ignored); masked: (B, h, w) bool; cond: (B, L_c, D)
        already projected -> logits (B, h, w, K)."""
        B, h, w = tokens.shape
        self.check_grid(h, w)
        pos = self.pos_emb[:h, :w].reshape(1, h * w, -1)  # (1, N, D)
        masked = masked.reshape(B, h * w)  # (B, N)
        x = self.tok_emb(tokens.reshape(B, h * w).masked_fill(masked, 0)) + pos  # (B, N, D)

        # Cross-attention (Algorithm 2): queries = [buffer; tokens], keys / values = [tokens; cond]. Masked
        # positions are removed by the attention mask on the key side and their query outputs are discarded, which
        # equals attending from the unmasked tokens only while keeping a fixed (B, N) layout for any mask ratio.
        q = torch.cat([self.buffer.expand(B, 1, -1), x], dim=1)  # (B, 1 + N, D)
        kv = torch.cat([x, cond], dim=1)  # (B, N + L_c, D)
        keep = torch.cat([~masked, masked.new_ones(B, cond.shape[1])], dim=1)  # (B, N + L_c)
        c = self.cross(q, kv, keep[:, None, None, :])  # (B, 1 + N, D)

        # The stack sees the buffer, the cross-attention output at unmasked positions and [MASK] + position at
        # masked ones (MAGE's decoder input).
        filler = self.mask_emb + pos  # (1, N, D)
        x = torch.cat([c[:, :1], torch.where(masked[..., None], filler, c[:, 1:])], dim=1)  # (B, 1 + N, D)
        for block in self.blocks:
            x = run_block(block, self.grad_checkpointing, x)  # (B, 1 + N, D)
        return self.logits(self.norm(x[:, 1:])).view(B, h, w, -1)  # (B, h, w, K)


class PerceiverHead(nn.Module):
    """Projector h_omega + the Perceiver g_phi."""

    def __init__(self, arch: PerceiverArch, cond_dim: int, codebook_size: int):
        super().__init__()
        self.arch = arch
        self.projector = Projector(cond_dim, arch.width)
        self.denoiser = Perceiver(arch, codebook_size)

    def check_target(self, target_shape: tuple[int, ...]) -> None:
        """target_shape: (h, w) of a grid of codes."""
        if len(target_shape) != 2:
            raise ValueError(f"a (h, w) grid of VQ codes is needed, got a target of shape {tuple(target_shape)}")
        self.denoiser.check_grid(*target_shape)

    def forward(self, tokens: torch.Tensor, masked: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens, masked: (B, h, w); cond: (B, L_c, D_c) condition tokens -> logits (B, h, w, K)."""
        return self.denoiser(tokens, masked, self.projector(cond))


ARCH, LATENT_KIND = PerceiverArch, "discrete"


def build(arch: PerceiverArch, cond_dim: int, latent) -> PerceiverHead:
    """Projector + Perceiver for condition tokens of width ``cond_dim`` over a discrete ``latent`` (reads only
    ``latent.codebook_size``; works under ``torch.device("meta")``)."""
    size = int(latent.codebook_size)
    if arch.codebook_size is not None and arch.codebook_size != size:
        raise ValueError(f"the VQ tokenizer has {size} codes but the denoiser was configured for "
                         f"{arch.codebook_size}: use the matching VQ model (model.latent_path) or set "
                         f"model.denoiser_arch.codebook_size={size}")
    return PerceiverHead(arch, cond_dim, size)
