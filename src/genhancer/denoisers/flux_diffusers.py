"""The same network as diffusers' ``FluxTransformer2DModel``: configuration, weights and call.

diffusers implements this architecture as most people would use it, so it is the reference ``scripts/bench_denoiser.py``
times ours against, and the function ``tests/test_flux_diffusers.py`` checks ours computes. Differences that are not
the function: diffusers splits every fused q / k / v projection into three linears (same parameters), orders the
final modulation (scale, shift) where we have (shift, scale), takes the guidance as an input where we hold a
constant, and rounds the sinusoidal timestep features to the activation dtype (bf16 under autocast) before the
first linear, which we do not.
"""

from __future__ import annotations

import torch

from .flux import Flux, FluxArch


def diffusers_config(a: FluxArch) -> dict:
    """``FluxTransformer2DModel`` arguments of the same architecture (its MLP ratio is fixed at 4, q / k / v biased)."""
    if a.mlp_ratio != 4.0 or a.theta != 10_000:
        raise ValueError("diffusers' FluxTransformer2DModel has mlp_ratio 4 and RoPE theta 10000")
    return dict(patch_size=1, in_channels=a.in_channels, num_layers=a.depth_double,
                num_single_layers=2 * a.depth_double if a.depth_single is None else a.depth_single,
                attention_head_dim=a.hidden // a.heads, num_attention_heads=a.heads, joint_attention_dim=a.ctx_dim,
                pooled_projection_dim=a.vec_dim, guidance_embeds=a.guidance_embed, axes_dims_rope=tuple(a.axes_dim))


def diffusers_state_dict(model: Flux) -> dict[str, torch.Tensor]:
    """Our weights under diffusers' names and layout (q / k / v split, final modulation halves swapped)."""
    ours = model.state_dict()
    D = model.arch.hidden
    state = {}

    def copy(src, dst):  # a linear or a norm scale, renamed
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in ours:
                state[f"{dst}.{kind}"] = ours[f"{src}.{kind}"]

    def split(src, dsts):  # a fused projection into consecutive row blocks (q, k, v[, mlp])
        weight, bias = ours[f"{src}.weight"], ours.get(f"{src}.bias")
        sizes = [D] * (len(dsts) - 1) + [weight.shape[0] - D * (len(dsts) - 1)]
        biases = bias.split(sizes) if bias is not None else [None] * len(dsts)
        for dst, w, b in zip(dsts, weight.split(sizes), biases):
            state[f"{dst}.weight"], state[f"{dst}.bias"] = w, w.new_zeros(w.shape[0]) if b is None else b

    for src, dst in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                     ("guidance_in", "guidance_embedder")):
        copy(f"{src}.in_layer", f"time_text_embed.{dst}.linear_1")
        copy(f"{src}.out_layer", f"time_text_embed.{dst}.linear_2")
    copy("txt_in", "context_embedder")
    copy("img_in", "x_embedder")
    for i in range(len(model.double_blocks)):
        o, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for stream, mod, qkv, norm, out, ff in (("img", "norm1", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"),
                                                  "to_out.0", "ff"),
                                                 ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"),
                                                  ("norm_added_q", "norm_added_k"), "to_add_out", "ff_context")):
            copy(f"{o}.{stream}_mod.lin", f"{t}.{mod}.linear")
            split(f"{o}.{stream}_attn.qkv", [f"{t}.attn.{n}" for n in qkv])
            copy(f"{o}.{stream}_attn.norm.query_norm", f"{t}.attn.{norm[0]}")
            copy(f"{o}.{stream}_attn.norm.key_norm", f"{t}.attn.{norm[1]}")
            copy(f"{o}.{stream}_attn.proj", f"{t}.attn.{out}")
            copy(f"{o}.{stream}_mlp.0", f"{t}.{ff}.net.0.proj")
            copy(f"{o}.{stream}_mlp.2", f"{t}.{ff}.net.2")
    for i in range(len(model.single_blocks)):
        o, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        copy(f"{o}.modulation.lin", f"{t}.norm.linear")
        split(f"{o}.linear1", [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp"])
        copy(f"{o}.norm.query_norm", f"{t}.attn.norm_q")
        copy(f"{o}.norm.key_norm", f"{t}.attn.norm_k")
        copy(f"{o}.linear2", f"{t}.proj_out")
    shift_scale = "final_layer.adaLN_modulation.1"
    for kind in ("weight", "bias"):
        shift, scale = ours[f"{shift_scale}.{kind}"].chunk(2)
        state[f"norm_out.linear.{kind}"] = torch.cat([scale, shift])
    copy("final_layer.linear", "proj_out")
    return {name: tensor.clone() for name, tensor in state.items()}  # no storage shared with ours


def to_diffusers(model: Flux):
    """A ``FluxTransformer2DModel`` computing the same function as ``model`` (weights copied)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        reference = FluxTransformer2DModel(**diffusers_config(model.arch))
    reference.load_state_dict(diffusers_state_dict(model), strict=True, assign=True)
    return reference.to(next(model.parameters()).device)


def diffusers_call(reference, img, img_ids, txt, txt_ids, t, vec_cond, guidance: float):
    """``reference`` on the inputs of :meth:`Flux.forward` -> (B, Li, in_channels)."""
    g = torch.full_like(t, guidance) if reference.config.guidance_embeds else None
    return reference(hidden_states=img, encoder_hidden_states=txt, pooled_projections=vec_cond, timestep=t,
                     img_ids=img_ids, txt_ids=txt_ids, guidance=g, return_dict=False)[0]
