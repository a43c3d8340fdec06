"""Discrete denoiser: a lightweight Perceiver that predicts masked VQ-GAN tokens from the encoder's condition.

Paper (Sec. 4.4, Algorithm 2, Eq. 4): mask a share r of the image's VQ tokens; queries are the unmasked tokens'
embeddings, keys / values the concatenation of those embeddings and the projected condition ``h_omega(v_theta(x))``;
the cross-attention output conditions an L-layer transformer that predicts the codebook index of every masked
position, trained by cross-entropy on masked positions only.

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
* Masking: per-sample ratio ~ U[mask_ratio_min, mask_ratio_max] (paper: 50-90 %, following MAGE), or a fixed
  ``mask_ratio`` (Table 8); ``round(r * N)`` positions chosen uniformly at random, at least one.
* Reconstruction preview: MaskGIT's iterative parallel decoding (cosine schedule, Gumbel-perturbed confidence
  re-masking with an annealed temperature).

The arch dataclass carries the objective's mask settings; the trainer copies ``objective.mask_ratio_min``,
``objective.mask_ratio_max``, ``objective.mask_ratio`` (and ``train.grad_checkpointing``) into the arch overrides
before ``build`` (``genhancer.enhancer.head_overrides``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError
from ..projector import Projector
from .base import GenerativeHead


@dataclass(frozen=True)
class PerceiverArch:
    """Architecture and masking of the discrete denoiser."""

    depth: int = 6  # L transformer layers after the cross-attention (paper: 6)
    width: int = 768
    heads: int = 12
    mlp_ratio: float = 4.0
    max_grid: int = 32  # side of the learned position table: latent grids up to 32 x 32 (512 px at f16)
    codebook_size: int | None = None  # None: the latent space's; set to pin it (a mismatch is a ConfigError)
    mask_ratio_min: float = 0.5  # per-sample mask ratio ~ U[min, max] (paper: 50-90 %)
    mask_ratio_max: float = 0.9
    mask_ratio: float | None = None  # fixed ratio instead of the range (Table 8)
    choice_temperature: float = 4.5  # MaskGIT's re-masking temperature (annealed to 0) for `sample`
    grad_checkpointing: bool = False  # recompute the L layers in backward (train.grad_checkpointing)


PRESETS: dict[str, PerceiverArch] = {
    "perceiver-l2": PerceiverArch(depth=2),
    "perceiver-l4": PerceiverArch(depth=4),
    "perceiver-l6": PerceiverArch(depth=6),
    "perceiver-l8": PerceiverArch(depth=8),
    "perceiver-tiny": PerceiverArch(depth=2, width=32, heads=2, max_grid=16),
}


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
        self.tok_emb = nn.Embedding(codebook_size, D)
        self.pos_emb = nn.Parameter(torch.zeros(arch.max_grid, arch.max_grid, D))
        self.mask_emb = nn.Parameter(torch.zeros(D))
        self.buffer = nn.Parameter(torch.zeros(D))
        self.cross = CrossAttentionBlock(D, arch.heads, arch.mlp_ratio)
        self.blocks = nn.ModuleList(Block(D, arch.heads, arch.mlp_ratio) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(D)
        self.logits = nn.Linear(D, codebook_size)
        self.grad_checkpointing = arch.grad_checkpointing
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
        # Weights of a head trained over another tokenizer (stage-2 init_from, resume) fail with the fix named.
        saved = state_dict.get(prefix + "logits.bias")
        if saved is not None and saved.shape[0] != self.codebook_size:
            raise ConfigError(f"the saved discrete denoiser predicts {saved.shape[0]} codes but the VQ tokenizer has "
                              f"{self.codebook_size}: set model.latent_path to the VQ model the head was trained with")
        saved = state_dict.get(prefix + "pos_emb")
        if saved is not None and saved.shape[0] != self.max_grid:
            raise ConfigError(f"the saved discrete denoiser has a {saved.shape[0]}x{saved.shape[0]} position table: "
                              f"set model.denoiser_arch.max_grid={saved.shape[0]}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, tokens: torch.Tensor, masked: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens: (B, h, w) long (values at masked positions ignored); masked: (B, h, w) bool; cond: (B, L_c, D)
        already projected -> logits (B, h, w, K)."""
        B, h, w = tokens.shape
        if h > self.max_grid or w > self.max_grid:
            raise ConfigError(f"latent grid {h}x{w} exceeds the discrete denoiser's position table "
                              f"{self.max_grid}x{self.max_grid}: set model.denoiser_arch.max_grid={max(h, w)}")
        pos = self.pos_emb[:h, :w].reshape(1, h * w, -1)
        masked = masked.reshape(B, h * w)
        x = self.tok_emb(tokens.reshape(B, h * w).masked_fill(masked, 0)) + pos  # (B, N, D)

        # Cross-attention (Algorithm 2): queries = [buffer; tokens], keys / values = [tokens; cond]. Masked
        # positions are removed by the attention mask on the key side and their query outputs are discarded, which
        # equals attending from the unmasked tokens only while keeping a fixed (B, N) layout for any mask ratio.
        q = torch.cat([self.buffer.expand(B, 1, -1), x], dim=1)  # (B, 1 + N, D)
        kv = torch.cat([x, cond], dim=1)  # (B, N + L_c, D)
        keep = torch.cat([~masked, masked.new_ones(B, cond.shape[1])], dim=1)  # (B, N + L_c)
        c = self.cross(q, kv, keep[:, None, None, :])

        # The stack sees the buffer, the cross-attention output at unmasked positions and [MASK] + position at
        # masked ones (MAGE's decoder input).
        filler = self.mask_emb + pos
        x = torch.cat([c[:, :1], torch.where(masked[..., None], filler, c[:, 1:])], dim=1)
        for block in self.blocks:
            recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return self.logits(self.norm(x[:, 1:])).view(B, h, w, -1)


class PerceiverHead(GenerativeHead):
    """h_omega + Perceiver g_phi, trained by cross-entropy on masked VQ tokens (Eq. 4)."""

    latent_kind = "discrete"

    def __init__(self, arch: PerceiverArch, cond_dim: int, codebook_size: int):
        super().__init__()
        lo, hi, fixed = arch.mask_ratio_min, arch.mask_ratio_max, arch.mask_ratio
        if not all(r is None or 0.0 < r < 1.0 for r in (lo, hi, fixed)) or lo > hi:
            raise ConfigError(f"mask ratios must lie in (0, 1) with min <= max, got min={lo} max={hi} fixed={fixed}: "
                              "fix objective.mask_ratio_min / mask_ratio_max / mask_ratio")
        self.arch = arch
        self.codebook_size = codebook_size
        self.projector = Projector(cond_dim, arch.width)
        self.denoiser = Perceiver(arch, codebook_size)

    def mask_ratios(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) per-sample mask ratios: the fixed one, or U[min, max]."""
        if self.arch.mask_ratio is not None:
            return torch.full((n,), self.arch.mask_ratio)
        u = torch.rand(n, generator=generator, device=generator.device).cpu()
        return self.arch.mask_ratio_min + (self.arch.mask_ratio_max - self.arch.mask_ratio_min) * u

    def draw(self, n: int, target_shape: tuple[int, ...], generator: torch.Generator,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """target_shape: (h, w) -> {"mask": (n, h, w) bool, True = masked}."""
        h, w = target_shape
        N = h * w
        n_masked = (self.mask_ratios(n, generator) * N).round().clamp(1, N).long()  # (n,)
        scores = torch.rand(n, N, generator=generator, device=generator.device).cpu()
        rank = scores.argsort(dim=1).argsort(dim=1)  # uniform random permutation rank of each position
        mask = rank < n_masked[:, None]
        return {"mask": mask.view(n, h, w).to(device)}

    def logits(self, tokens: torch.Tensor, masked: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens, masked: (B, h, w); cond: (B, L_c, D_c) -> (B, h, w, K)."""
        return self.denoiser(tokens, masked, self.projector(cond))

    def loss(self, target: torch.Tensor, cond: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """target: (B, h, w) code indices; cond: (B, L_c, D_c) -> (B,) mean cross-entropy over masked positions."""
        # Indices may arrive as floats from a float32 target cache; exact there, but anything fractional is a
        # continuous latent.
        if target.dim() != 3 or (target.is_floating_point() and not torch.equal(target, target.round())):
            raise ConfigError(f"the discrete denoiser needs VQ code indices (B, h, w), got {tuple(target.shape)} "
                              f"{target.dtype}: use a discrete latent space (model.latent=vq)")
        target, mask = target.long(), draws["mask"]
        logits = self.logits(target, mask, cond).float()
        ce = F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none").view_as(mask)
        m = mask.float()
        return (ce * m).sum(dim=(1, 2)) / m.sum(dim=(1, 2))

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, target_shape: tuple[int, ...], generator: torch.Generator,
               steps: int = 25) -> torch.Tensor:
        """MaskGIT decoding. cond: (B, L_c, D_c) -> code indices (B, h, w).

        Start fully masked; each step samples every masked position, keeps the most confident samples and re-masks
        the rest so that cos(pi/2 * (t+1)/steps) of the grid stays masked. Confidence is the sampled token's log-
        probability plus Gumbel noise scaled by a temperature annealed to 0, as in MaskGIT.
        """
        B, (h, w) = cond.shape[0], target_shape
        N, dev = h * w, cond.device
        c = self.projector(cond)
        tokens = torch.zeros(B, h, w, dtype=torch.long, device=dev)
        masked = torch.ones(B, h, w, dtype=torch.bool, device=dev)

        def gumbel(shape):
            u = torch.rand(shape, generator=generator, device=generator.device).to(dev)
            return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))

        for t in range(steps):
            logits = self.denoiser(tokens, masked, c).float()  # (B, h, w, K)
            sampled = (logits + gumbel(logits.shape)).argmax(-1)  # Gumbel-max = a draw from softmax(logits)
            tokens = torch.where(masked, sampled, tokens)
            ratio = (t + 1) / steps
            n_next = math.floor(N * math.cos(math.pi / 2 * ratio))
            if n_next == 0:
                masked = torch.zeros_like(masked)
                continue
            logp = logits.log_softmax(-1).gather(-1, sampled[..., None])[..., 0]
            confidence = logp + self.arch.choice_temperature * (1 - ratio) * gumbel(logp.shape)
            confidence = confidence.masked_fill(~masked, math.inf).view(B, N)  # decided tokens stay decided
            # Re-mask the n_next least confident, at least one fewer than are masked now so every step decides one.
            n_next = min(n_next, int(masked.view(B, N).sum(1).min()) - 1)
            lowest = confidence.argsort(dim=1)[:, :max(n_next, 0)]
            masked = torch.zeros(B, N, dtype=torch.bool, device=dev).scatter_(1, lowest, True).view(B, h, w)
        return tokens


def build(arch: PerceiverArch, cond_dim: int, latent) -> PerceiverHead:
    """Projector + Perceiver for condition tokens of width ``cond_dim`` over ``latent`` (needs only
    ``latent.codebook_size``; works under ``torch.device("meta")``)."""
    if getattr(latent, "codebook_size", None) is None:
        raise ConfigError(f"the Perceiver denoiser predicts VQ codes but model.latent is a "
                          f"{getattr(latent, 'kind', 'continuous')} space: use a VQ latent (model.latent=vq)")
    size = int(latent.codebook_size)
    if arch.codebook_size is not None and arch.codebook_size != size:
        raise ConfigError(f"the VQ tokenizer has {size} codes but the denoiser was configured for "
                          f"{arch.codebook_size}: use the matching VQ model (model.latent_path) or set "
                          f"model.denoiser_arch.codebook_size={size}")
    return PerceiverHead(arch, cond_dim, size)
