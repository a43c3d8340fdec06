"""VQ tokenizers: the VQ-GANs (diffusers ``VQModel``) behind the discrete latent space, trained or converted.

* :class:`~genhancer.latents.VQSpace` (in ``latents.py``) is the ``LatentSpace`` of the discrete denoiser over
  such a model.
* :func:`train_vq` trains the tiny VQ model (``configs/vq/tiny.json``) on the project's own images, so discrete runs
  and tests work offline (``genhancer train-vq``).
* :func:`convert_vqgan` turns a taming-transformers VQGAN checkpoint (the f16 ImageNet models with 1024 or 16384
  codes used by MaskGIT / MAGE-style work) into a ``VQModel`` folder (``genhancer convert-vqgan``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .images import folder_crops
from .latents import VQSpace, shipped_config


def vq_config(name_or_path: str) -> dict:
    """A VQModel config: a shipped name (tiny, f16-1024, f16-16384) or a JSON file."""
    import json

    p = Path(name_or_path)
    if p.is_file():
        return json.loads(p.read_text())
    try:
        return shipped_config("vq", name_or_path)
    except FileNotFoundError:
        raise ConfigError(f"unknown VQ config '{name_or_path}': use tiny, f16-1024, f16-16384 or a JSON file") from None


# ----------------------------------------------------------------------------------------------------------------
# Images for train-vq


def synthetic_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: a flat background with three axis-aligned colored rectangles each."""
    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    images = (rand(n, 3, 1, 1) * 2 - 1).expand(n, 3, size, size).clone()
    corners = (rand(n, 3, 2) * size * 0.75).long()
    sides = (rand(n, 3, 2) * size * 0.5).long() + size // 8
    colors = rand(n, 3, 3) * 2 - 1
    for i in range(n):
        for j in range(3):
            (y, x), (hh, ww) = corners[i, j].tolist(), sides[i, j].tolist()
            images[i, :, y:y + hh, x:x + ww] = colors[i, j, :, None, None]
    return images


def folder_images(path: str, size: int) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]: every readable image file under ``path``, center-cropped and resized."""
    return folder_crops(path, size) * 2 - 1


# ----------------------------------------------------------------------------------------------------------------
# train-vq


def train_vq(images: torch.Tensor, out_dir: str | None = None, config: str | dict = "tiny", steps: int = 500,
             batch_size: int = 16, lr: float = 1e-3, seed: int = 0, device: str = "cpu",
             log=None) -> tuple["VQSpace", list[float]]:
    """Train a VQ model on ``images: (N, 3, S, S)`` in [-1, 1]; returns the frozen space and per-step losses.

    Loss: pixel MSE + the VQ codebook / commitment terms (VQ-VAE). No adversarial or perceptual loss: the tiny
    tokenizer only has to give the discrete denoiser a faithful, offline code grid.
    """
    from diffusers import VQModel

    cfg = vq_config(config) if isinstance(config, str) else config
    torch.manual_seed(seed)
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise ConfigError(f"image size {tuple(images.shape[-2:])} is not divisible by the VQ model's downsampling "
                          f"factor {factor}: use a multiple of {factor} (--size)")
    vq = VQModel.from_config(cfg).to(device)
    g = torch.Generator().manual_seed(seed)
    batch = lambda: images[torch.randint(len(images), (batch_size,), generator=g)].to(device)  # noqa: E731
    with torch.no_grad():
        # Codebook from encoder outputs of a first batch: every code starts in use instead of dying at random init.
        z = vq.encode(batch()).latents
        z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).cpu()
        pick = torch.randint(len(z), (vq.config.num_vq_embeddings,), generator=g)
        vq.quantize.embedding.weight.copy_(z[pick] + 0.01 * torch.randn(z[pick].shape, generator=g))
    vq.train()
    opt = torch.optim.Adam(vq.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x = batch()
        out = vq(x)
        loss = F.mse_loss(out.sample, x) + out.commit_loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log and (step % max(steps // 10, 1) == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps} loss {loss.item():.4f}")
    vq = vq.cpu()
    if out_dir is not None:
        vq.save_pretrained(out_dir)
    return VQSpace(vq), losses


# ----------------------------------------------------------------------------------------------------------------
# convert-vqgan: taming-transformers VQModel state dict -> diffusers VQModel


def _rename(key: str, levels: int) -> str:
    """One taming-transformers parameter name -> its diffusers ``VQModel`` name."""
    k = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.", key)
    k = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
    # taming numbers decoder levels from the highest resolution (up.0 runs last); diffusers in execution order.
    k = re.sub(r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.",
               lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}."
                         + {"block": "resnets.", "attn": "attentions.", "upsample": "upsamplers.0."}[m[2]], k)
    k = re.sub(r"\.nin_shortcut\.", ".conv_shortcut.", k)
    k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
    k = re.sub(r"(attentions\.\d+)\.(norm|q|k|v|proj_out)\.",
               lambda m: f"{m[1]}." + {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                                        "proj_out": "to_out.0"}[m[2]] + ".", k)
    return k


def taming_config(sd: dict[str, torch.Tensor], norm_num_groups: int = 32) -> dict:
    """The ``VQModel`` config equivalent to a taming-transformers VQGAN, read off its state dict's shapes."""
    def need(key):
        if key not in sd:
            raise ConfigError(f"'{key}' missing: not a taming-transformers VQGAN checkpoint "
                              "(expected encoder.*, decoder.*, quantize.embedding.weight)")
        return sd[key]

    levels = 1 + max(int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    per_level = 1 + max(int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    attn = [f"encoder.down.{i}.attn.0.q.weight" in sd for i in range(levels)]
    codebook = need("quantize.embedding.weight")
    return {
        "_class_name": "VQModel",
        "in_channels": int(need("encoder.conv_in.weight").shape[1]),
        "out_channels": int(need("decoder.conv_out.weight").shape[0]),
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "block_out_channels": [int(need(f"encoder.down.{i}.block.0.conv1.weight").shape[0]) for i in range(levels)],
        "layers_per_block": per_level,
        "act_fn": "silu",
        "latent_channels": int(need("encoder.conv_out.weight").shape[0]),
        "vq_embed_dim": int(codebook.shape[1]),
        "num_vq_embeddings": int(codebook.shape[0]),
        "norm_num_groups": norm_num_groups,
        "sample_size": 256,
        "scaling_factor": 1.0,
        "norm_type": "group",
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
    }


def taming_to_diffusers(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Renamed state dict; training-only ``loss.*`` weights (discriminator, LPIPS) dropped; 1x1 attention convs
    become the linear layers diffusers uses."""
    out = {}
    for key, value in sd.items():
        if key.startswith("loss."):
            continue
        new = _rename(key, levels)
        if ".attentions." in new and new.endswith(".weight") and value.dim() == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def load_taming_state_dict(ckpt: str, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The model weights of a taming checkpoint (Lightning ``.ckpt`` with ``state_dict``, ``.pt``, safetensors)."""
    p = Path(ckpt)
    if not p.is_file():
        raise ConfigError(f"VQGAN checkpoint '{ckpt}' not found: pass the path of a taming-transformers .ckpt file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # noqa: BLE001 - torch raises several types for non-tensor pickles
        raise ConfigError(f"'{ckpt}' could not be read as weights only ({str(e).splitlines()[0][:100]}): if you "
                          "trust the file, pass --trust-pickle") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise ConfigError(f"'{ckpt}' holds no state dict: pass a taming-transformers VQGAN checkpoint")
    return sd


def convert_vqgan(ckpt: str | dict, out_dir: str | None = None, expect: str | None = None,
                  trust_pickle: bool = False, norm_num_groups: int = 32):
    """Taming-transformers VQGAN (path or state dict) -> diffusers ``VQModel`` (saved to ``out_dir`` if given).

    ``expect`` names a shipped config (``f16-1024``, ``f16-16384``) the checkpoint must match: a different codebook
    size or downsampling factor is a ConfigError naming the field.
    """
    from diffusers import VQModel

    sd = ckpt if isinstance(ckpt, dict) else load_taming_state_dict(ckpt, trust_pickle)
    cfg = taming_config(sd, norm_num_groups)
    if expect is not None:
        want = vq_config(expect)
        for field in ("num_vq_embeddings", "block_out_channels", "vq_embed_dim", "latent_channels",
                      "down_block_types", "layers_per_block"):
            if want[field] != cfg[field]:
                raise ConfigError(f"checkpoint has {field}={cfg[field]} but '{expect}' expects {want[field]}: "
                                  f"convert a matching checkpoint or drop --expect")
    vq = VQModel.from_config(cfg)
    mapped = taming_to_diffusers(sd, len(cfg["block_out_channels"]))
    own = vq.state_dict()
    unknown = sorted(set(mapped) - set(own))
    missing = sorted(set(own) - set(mapped))
    if unknown or missing:
        raise ConfigError(f"checkpoint does not match a taming VQGAN layout (unmapped: {unknown[:3]}, missing: "
                          f"{missing[:3]}): pass a taming-transformers VQModel checkpoint")
    for key, value in mapped.items():
        if value.shape != own[key].shape:
            raise ConfigError(f"'{key}' has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}: "
                              "the checkpoint's architecture is not a taming VQGAN")
    vq.load_state_dict(mapped, strict=True)
    if out_dir is not None:
        vq.save_pretrained(out_dir)
    return vq

