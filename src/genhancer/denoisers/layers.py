"""The FLUX-like denoiser's hot-path kernels: RoPE, joint attention with QK-norm, fused projections used by parts,
and forward-only MLP slicing. Pure functions and two autograd functions, no parameters (``flux.py`` holds them).

Why they exist (measured against diffusers' ``FluxTransformer2DModel`` in ``scripts/bench_denoiser.py``, see
docs/performance.md): each removes a copy, a buffer or a kernel that the straightforward composition of torch ops
makes in forward or backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_table(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """ids: (L, n_axes) positions, the same for every sample -> rotations exp(i angle), (L, head_dim // 2) complex64.

    Angles are formed in float64 (positions times frequencies lose bits in float32 at large positions).
    """
    angles = []
    for i, d in enumerate(axes_dim):
        omega = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)  # (d/2,)
        angles.append(ids[:, i].double()[:, None] * omega)  # (L, d/2)
    angles = torch.cat(angles, dim=-1)  # (L, Dh/2)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope_(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x: (..., Dh) float32, consecutive pairs of its last dim read as complex numbers, multiplied in place by
    ``table`` (complex, broadcastable to (..., Dh/2)): each pair rotated by its angle. Returns x.

    In place because x is always a fresh temporary here (in :class:`NormRope`, which writes its own backward): no
    second buffer of its size is made.
    """
    torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(table)  # (..., Dh/2) complex view of x
    return x


def inverse_rms(qk: torch.Tensor) -> torch.Tensor:
    """(..., Dh) -> (..., 1) float32: 1 / sqrt(mean(x^2) + 1e-6), from one norm reduction (no squared copy)."""
    ms = torch.linalg.vector_norm(qk, dim=-1, keepdim=True, dtype=torch.float32).square() / qk.shape[-1]
    return torch.rsqrt(ms + 1e-6)


class NormRope(torch.autograd.Function):
    """RMS norm with learned scales, then RoPE, of q and k together: (B, L, 2, H, Dh) -> float32, same shape.

    Written out with its backward so that it saves only its input (a view of the qkv projection, which backward
    keeps anyway) and the inverse RMS (one number per head): autograd would also keep the normalised q and k, a
    float32 copy of both, in every block. Backward recomputes them instead (one multiply).
    """

    @staticmethod
    def forward(ctx, qk, scale, table):
        """qk: (B, L, 2, H, Dh); scale: (2, 1, Dh) or (L, 2, 1, Dh); table: (L, 1, 1, Dh/2) complex."""
        inv_rms = inverse_rms(qk)  # (B, L, 2, H, 1)
        ctx.save_for_backward(qk, inv_rms, scale, table)
        return apply_rope_((qk * inv_rms).mul_(scale), table)  # in place: one float32 buffer

    @staticmethod
    def backward(ctx, grad):
        qk, inv_rms, scale, table = ctx.saved_tensors
        grad = torch.view_as_complex(grad.float().contiguous().unflatten(-1, (-1, 2))) * table.conj()
        grad = torch.view_as_real(grad).flatten(-2)  # d loss / d (x_hat * scale), rotated back; a new buffer
        x_hat = qk * inv_rms  # the normalised input, recomputed
        # summed over the batch (and positions) first: an outer-dimension sum, many times faster than sum_to_size's
        # strided one on CPU; the heads, a few per row, last
        grad_scale = (grad * x_hat).flatten(0, grad.dim() - scale.dim() - 1).sum(0).sum_to_size(scale.shape)
        grad.mul_(scale)  # d loss / d x_hat
        # RMS norm backward: (g - x_hat * mean(g * x_hat)) / rms
        grad_qk = grad.sub_(x_hat.mul_((grad * x_hat).mean(-1, keepdim=True))).mul_(inv_rms)
        return grad_qk.to(qk.dtype), grad_scale, None


def attention(qk: torch.Tensor, v: torch.Tensor, qk_scale: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Joint attention.

    qk: (B, L, 2, H, Dh) queries and keys; v: (B, L, H, Dh); qk_scale: the learned RMS scales of q and k,
    (2, 1, Dh) or per position (L, 2, 1, Dh); table: RoPE rotations (L, 1, 1, Dh/2) -> (B, L, H * Dh).

    q and k are normalised, scaled and rotated together in float32 (:class:`NormRope`), then cast back to v's
    dtype; forward only under autocast, one after the other, so that the float32 buffer is half the size and never
    alive beside a bf16 copy of both (the same values). The heads stay in (B, L, H, Dh) memory order: SDPA reads
    the (B, H, L, Dh) views by their strides and writes that order back, so no layout copy is made.
    """
    if torch.is_grad_enabled() or v.dtype == torch.float32:
        qk = NormRope.apply(qk, qk_scale, table).to(v.dtype)  # the float32 buffer is released here under bf16
    else:
        normed = torch.empty(qk.shape, dtype=v.dtype, device=qk.device)  # (B, L, 2, H, Dh)
        for j in range(2):  # q, then k
            x, scale = qk.narrow(2, j, 1), qk_scale.narrow(-3, j, 1)  # (B, L, 1, H, Dh), (1 | L, 1, 1, Dh)
            normed.narrow(2, j, 1).copy_(apply_rope_((x * inverse_rms(x)).mul_(scale), table))
        qk = normed
    q, k = (x.transpose(1, 2) for x in qk.unbind(2))  # 2 x (B, H, L, Dh), views; their gradient stacks contiguous
    out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2))  # (B, H, L, Dh)
    return out.transpose(1, 2).flatten(2)  # (B, L, H * Dh)


class LinearBlocks(torch.autograd.Function):
    """``F.linear(x, weight, bias).split(sizes, -1)`` without concatenating anything in backward.

    A fused projection (q, k, v; the MLP input) is used by parts. Splitting its output makes backward concatenate
    the parts' gradients, an activation-sized copy; splitting its weight into row blocks makes it concatenate the
    blocks' weight gradients, a weight-sized copy (which dominates at the paper's width and small batches). Here
    each block's weight gradient is written straight into its rows of one gradient buffer, and the input gradient
    is accumulated in place. Under autocast it computes in the autocast dtype, as ``F.linear`` would.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, sizes):
        """x: (..., D); weight: (sum(sizes), D); bias: (sum(sizes),) or None -> one (..., n) tensor per size n."""
        device = x.device.type
        autocast = device != "meta" and torch.is_autocast_enabled(device)  # meta: FLOP counting, no autocast
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        x_c, w_c = x.to(dtype), weight.to(dtype)
        b_c = bias.to(dtype).split(sizes) if bias is not None else [None] * len(sizes)
        ctx.save_for_backward(x_c, w_c)
        ctx.sizes, ctx.dtypes = sizes, (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return tuple(F.linear(x_c, w, b) for w, b in zip(w_c.split(sizes), b_c))

    @staticmethod
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors  # in the compute dtype
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        rows = x.reshape(-1, x.shape[-1])  # (N, D)
        grad_w = weight.new_empty(weight.shape, dtype=w_dtype)  # (sum(sizes), D), filled block by block
        grad_b = weight.new_empty(weight.shape[0], dtype=b_dtype) if b_dtype is not None else None
        grad_x = None
        for i, (g, w) in enumerate(zip(grads, weight.split(ctx.sizes))):
            g = g.reshape(-1, g.shape[-1]).to(weight.dtype)  # (N, n)
            block = grad_w.split(ctx.sizes)[i]  # (n, D): its rows of the gradient
            if block.dtype == g.dtype:
                torch.mm(g.t(), rows, out=block)
            else:  # autocast: computed in its dtype, converted block by block (no whole-weight temporary)
                block.copy_(g.t() @ rows)
            if grad_b is not None:
                grad_b.split(ctx.sizes)[i].copy_(g.sum(dim=0))
            # accumulated in place; addmm's out= form, which FLOP counters see (they do not see addmm_)
            grad_x = g @ w if grad_x is None else torch.addmm(grad_x, g, w, out=grad_x)  # (N, D)
        return grad_x.view(x.shape).to(x_dtype), grad_w, grad_b, None


def row_blocks(linear: nn.Linear, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of ``linear`` split into row blocks of ``sizes`` (views): forward-only use by parts."""
    biases = linear.bias.split(sizes) if linear.bias is not None else [None] * len(sizes)
    return list(zip(linear.weight.split(sizes), biases))


def linear_blocks(x: torch.Tensor, linear: nn.Linear, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """``linear(x).split(sizes, -1)``: through :class:`LinearBlocks` when gradients are recorded."""
    if torch.is_grad_enabled():
        return LinearBlocks.apply(x, linear.weight, linear.bias, sizes)
    return tuple(F.linear(x, w, b) for w, b in row_blocks(linear, sizes))


def mlp_chunks(x: torch.Tensor) -> int:
    """How many token slices a forward-only MLP runs over, for x: (B, L, D): up to 4, one per D rows. Slicing pays
    where the (B, L, 4D) hidden state outweighs the MLP's weights (4D x D); below D rows it would only re-read them."""
    return max(1, min(4, x.shape[0] * x.shape[1] // x.shape[-1]))


def row_chunks(x: torch.Tensor, chunks: int) -> list[torch.Tensor]:
    """x: (B, L, D) -> ``chunks`` contiguous slices of its B * L rows, each (rows, D)."""
    return x.reshape(-1, x.shape[-1]).chunk(chunks)


def feed_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mlp(x) for x: (B, L, D). Forward only (no gradient recorded), over :func:`mlp_chunks` slices of the tokens:
    the (B, L, M) hidden state, four times wider than x, then never exists whole. With gradients it must be kept
    for backward anyway, so the MLP runs at once."""
    if torch.is_grad_enabled():
        return mlp(x)
    return torch.cat([mlp(part) for part in row_chunks(x, mlp_chunks(x))]).view(*x.shape[:-1], -1)
