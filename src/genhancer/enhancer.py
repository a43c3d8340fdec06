"""The whole GenHancer model of a run: vision backbone + frozen latent space + generative head, and the stage
rules that decide which of them learn."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .backbones import VisionBackbone, build_backbone, vision_linear_names
from .config import ConfigError, RunConfig, StageConfig
from .denoisers import build_head, denoiser_arch
from .denoisers.base import GenerativeHead
from .latents import LatentSpace, build_latent_space


class Enhancer(nn.Module):
    """Backbone v_theta, latent space and head (h_omega + g_phi) behind one per-sample loss."""

    def __init__(self, backbone: VisionBackbone, latent: LatentSpace, head: GenerativeHead, n_local: int = 0):
        super().__init__()
        self.backbone, self.latent, self.head = backbone, latent, head
        self.n_local = n_local
        self.image_size = backbone.image_size
        self.target_shape = latent.target_shape(self.image_size)

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """All randomness of one micro-batch of n samples (the head's, plus which local tokens join)."""
        draws = self.head.draw(n, self.target_shape, generator)
        if self.n_local:
            draws["local_index"] = torch.rand(n, self.backbone.num_patches, generator=generator).argsort(1)[:, : self.n_local]
        return draws

    def condition(self, batch: dict, local_index: torch.Tensor | None) -> torch.Tensor:
        """Condition tokens (B, 1 + K, D) from crops, or from cached encoder outputs when the batch has them."""
        if "cond" in batch:
            cond = batch["cond"]
            if local_index is None:
                return cond[:, :1]
            idx = local_index[..., None].expand(-1, -1, cond.shape[-1])
            return torch.cat([cond[:, :1], torch.gather(cond[:, 1:], 1, idx)], dim=1)
        return self.backbone(batch["pixels"], local_index)

    def target(self, batch: dict) -> torch.Tensor:
        """The latent-space target of the crops, or the cached one."""
        if "target" in batch:
            return batch["target"]
        with torch.no_grad():
            return self.latent.encode(batch["pixels"] * 2 - 1)

    def forward(self, batch: dict, draws: dict) -> torch.Tensor:
        """batch: pixels (B, 3, S, S) in [0, 1] (or cached target / cond); draws: this process's slice -> (B,)."""
        cond = self.condition(batch, draws.get("local_index"))
        return self.head.loss(self.target(batch), cond, draws)

    def weights_to_save(self) -> dict[str, torch.Tensor]:
        """The head (always) and every trainable encoder tensor: what a checkpoint must hold."""
        out = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        out.update({n: p for n, p in self.backbone.named_parameters(prefix="backbone") if p.requires_grad})
        return out

    def load_saved_weights(self, weights: dict[str, torch.Tensor], head_only: bool = False) -> None:
        head = {k[5:]: v for k, v in weights.items() if k.startswith("head.")}
        missing, unexpected = self.head.load_state_dict(head, strict=False)
        if missing or unexpected:
            raise ConfigError(f"checkpoint does not fit the configured denoiser (missing {len(missing)}, unexpected "
                              f"{len(unexpected)} tensors, e.g. {(missing + unexpected)[0]}): use the same model.denoiser")
        if not head_only:
            load_backbone_weights(self.backbone, weights)


def head_overrides(cfg: RunConfig) -> dict:
    """The preset overrides plus every objective / training setting the head's architecture declares."""
    arch = denoiser_arch(cfg.model.denoiser, cfg.model.denoiser_arch)
    fields = {f.name for f in dataclasses.fields(arch)}
    extra = {**dataclasses.asdict(cfg.objective), "grad_checkpointing": cfg.train.grad_checkpointing}
    return {**{k: v for k, v in extra.items() if k in fields}, **cfg.model.denoiser_arch}


def build_enhancer(cfg: RunConfig) -> Enhancer:
    """Backbone, latent space and a fresh head as ``cfg`` names them; nothing frozen or adapted yet."""
    backbone = build_backbone(cfg.model)
    latent = build_latent_space(cfg.model)
    latent.check_image_size(backbone.image_size)
    head = build_head(cfg.model.denoiser, head_overrides(cfg), backbone.cond_dim, latent)
    n_local = round(cfg.model.local_ratio * backbone.num_patches) if cfg.model.condition == "cls+local" else 0
    return Enhancer(backbone, latent, head, n_local)


def apply_stage(enh: Enhancer, stage: StageConfig, grad_checkpointing: bool = False) -> None:
    """Freeze and adapt parameters as the stage says (stage 1: head only; stage 2: encoder, head optional)."""
    enh.latent.requires_grad_(False).eval()
    enh.head.requires_grad_(stage.stage in ("stage1", "e2e") or stage.train_head)
    adapt_encoder(enh.backbone, stage, grad_checkpointing)


def adapt_encoder(backbone: VisionBackbone, stage: StageConfig, grad_checkpointing: bool = False) -> None:
    """Frozen in stage 1; LoRA on every linear layer of the vision encoder (or all of it trainable) otherwise."""
    backbone.requires_grad_(False)
    if stage.stage == "stage1":
        backbone.eval()
        return
    if grad_checkpointing and hasattr(backbone.model, "gradient_checkpointing_enable"):
        backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if stage.finetune == "full":
        backbone.vision.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=stage.lora_r, lora_alpha=stage.lora_alpha, lora_dropout=stage.lora_dropout,
                          target_modules=vision_linear_names(backbone))
        backbone.model.vision_model = get_peft_model(backbone.vision, lora)
    backbone.train()


def load_backbone_weights(backbone: VisionBackbone, weights: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's ``backbone.*`` tensors into an identically adapted backbone."""
    params = dict(backbone.named_parameters(prefix="backbone"))
    for name, value in weights.items():
        if name.startswith("backbone."):
            if name not in params:
                raise ConfigError(f"checkpoint tensor '{name}' has no place in this backbone: use the run's stage settings")
            with torch.no_grad():
                params[name].copy_(value)


def merge_encoder(backbone: VisionBackbone) -> nn.Module:
    """The backbone's whole CLIP/SigLIP model with LoRA merged into plain weights."""
    vision = backbone.model.vision_model
    if hasattr(vision, "merge_and_unload"):
        backbone.model.vision_model = vision.merge_and_unload()
    return backbone.model
