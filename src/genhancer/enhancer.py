"""The task: vision backbone v_theta + frozen latent space + head (projector(s) h_omega + denoiser g_phi) +
objective behind one per-sample loss; how a run's model is built from its config; and the stage rules that decide
which parts learn.

The head (``genhancer.denoisers``) is pure networks and holds every trained tensor of the generative side (saved as
``head.*``); the objective (``genhancer.objectives``) holds the draws, the loss and the sampler and no tensors.
Configuration mistakes found while building (unknown preset or key, wrong latent kind, shapes the network cannot
take) are raised here as one-line ``ConfigError``s.
"""

from __future__ import annotations

import dataclasses
import difflib
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .backbones import VisionBackbone, build_backbone, vision_linear_names
from .config import ObjectiveConfig, RunConfig, StageConfig
from .errors import ConfigError
from .denoisers import DENOISERS
from .latents import LatentSpace, build_latent_space
from .objectives import OBJECTIVES, Objective


def select_condition(tokens: torch.Tensor, local_index: torch.Tensor | None) -> torch.Tensor:
    """The condition: the global token plus the chosen local tokens, from the live backbone's or the cached tokens.

    tokens: (B, 1 + N, D), global token first then every patch token ((B, 1, D) suffices without local tokens);
    local_index: (B, K) patch indices or None -> (B, 1 + K, D).
    """
    if local_index is None:
        return tokens[:, :1]
    idx = local_index[..., None].expand(-1, -1, tokens.shape[-1])  # (B, K, D)
    return torch.cat([tokens[:, :1], torch.gather(tokens[:, 1:], 1, idx)], dim=1)


class Enhancer(nn.Module):
    """Backbone v_theta, latent space, head (h_omega + g_phi) and objective behind one per-sample loss."""

    def __init__(self, backbone: VisionBackbone, latent: LatentSpace, head: nn.Module, objective: Objective,
                 n_local: int = 0):
        super().__init__()
        self.backbone, self.latent, self.head = backbone, latent, head
        self.objective = objective
        self.n_local = n_local
        self.image_size = backbone.image_size
        self.target_shape = latent.target_shape(self.image_size)
        self.frozen_bf16 = False  # train.frozen_bf16: frozen encoders under bf16 autocast (see frozen_precision)

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """All randomness of one micro-batch of n samples (the objective's, plus which local tokens join)."""
        draws = self.objective.draw(n, self.target_shape, generator)
        if self.n_local:
            draws["local_index"] = torch.rand(n, self.backbone.num_patches, generator=generator).argsort(1)[:, : self.n_local]
        return draws

    def frozen_precision(self, encoder: nn.Module, x: torch.Tensor):
        """bf16 autocast around a frozen ``encoder`` when ``frozen_bf16`` (else the step's own precision).

        A frozen encoder's output is a constant input of the step, so its rounding is all bf16 costs there: on the
        tiny preset's autoencoder, 0.9% relative error on the latents (docs/performance.md) for two thirds of the
        time. An encoder with a trainable parameter (stage 2, e2e) keeps the step's precision.
        """
        frozen = self.frozen_bf16 and not any(p.requires_grad for p in encoder.parameters())
        if not frozen or x.device.type == "meta":  # meta: FLOP counting, where precision changes nothing
            return nullcontext()
        return torch.autocast(x.device.type, torch.bfloat16)

    def tokens(self, pixels: torch.Tensor, local: bool) -> torch.Tensor:
        """The backbone's tokens (B, 1 [+ N], D); float32 when a bf16 frozen encoder made them."""
        precision = self.frozen_precision(self.backbone, pixels)
        with precision:
            tokens = self.backbone(pixels, local=local)
        return tokens.float() if isinstance(precision, torch.autocast) else tokens

    def condition(self, batch: dict, local_index: torch.Tensor | None) -> torch.Tensor:
        """Condition tokens (B, 1 + K, D) from crops, or from cached encoder outputs when the batch has them."""
        tokens = batch["cond"] if "cond" in batch else self.tokens(batch["pixels"], local=local_index is not None)
        return select_condition(tokens, local_index)

    def target(self, batch: dict) -> torch.Tensor:
        """The latent-space target of the crops, or the cached one."""
        if "target" in batch:
            return batch["target"]
        pixels = batch["pixels"]
        with torch.no_grad(), self.frozen_precision(self.latent, pixels):
            return self.latent.encode(pixels * 2 - 1)

    def loss(self, target: torch.Tensor, cond: torch.Tensor, draws: dict) -> torch.Tensor:
        """target: (B, *target_shape); cond: (B, L, D); draws -> per-sample loss (B,)."""
        return self.objective.loss(self.head, target, cond, draws)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: torch.Generator, steps: int = 25) -> torch.Tensor:
        """cond: (B, L, D) -> a target (B, *target_shape) generated from the condition alone."""
        return self.objective.sample(self.head, cond, self.target_shape, generator, steps)

    def forward(self, batch: dict, draws: dict) -> torch.Tensor:
        """batch: pixels (B, 3, S, S) in [0, 1] (or cached target / cond); draws: this process's slice -> (B,)."""
        return self.loss(self.target(batch), self.condition(batch, draws.get("local_index")), draws)

    def weights_to_save(self) -> dict[str, torch.Tensor]:
        """The head (always) and every trainable encoder tensor: what a checkpoint must hold."""
        out = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        out.update({n: p for n, p in self.backbone.named_parameters(prefix="backbone") if p.requires_grad})
        return out

    def load_saved_weights(self, weights: dict[str, torch.Tensor], head_only: bool = False) -> None:
        head = {k[5:]: v for k, v in weights.items() if k.startswith("head.")}
        with _config_errors():
            missing, unexpected = self.head.load_state_dict(head, strict=False)
        if missing or unexpected:
            raise ConfigError(f"checkpoint does not fit the configured denoiser (missing {len(missing)}, unexpected "
                              f"{len(unexpected)} tensors, e.g. {(missing + unexpected)[0]}): use the same model.denoiser")
        if not head_only:
            load_backbone_weights(self.backbone, weights)


@contextmanager
def _config_errors():
    """A network's ValueError (a shape it cannot take) as the user's one-line ConfigError."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def denoiser_arch(name: str, overrides: dict | None = None):
    """The architecture dataclass of preset ``name`` with ``overrides`` applied (unknown fields rejected)."""
    if name not in DENOISERS:
        close = difflib.get_close_matches(name, DENOISERS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(DENOISERS)}"
        raise ConfigError(f"unknown denoiser preset '{name}': {hint}")
    arch = DENOISERS[name].arch
    fields = [f.name for f in dataclasses.fields(arch)]
    for key in overrides or {}:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(fields))}"
            if key in {f.name for f in dataclasses.fields(ObjectiveConfig)}:
                hint = f"objective settings are not architecture: set objective.{key}"
            raise ConfigError(f"unknown key 'model.denoiser_arch.{key}' for denoiser '{name}': {hint}")
    return dataclasses.replace(arch, **(overrides or {}))


def build_head(name: str, overrides: dict | None, cond_dim: int, latent) -> nn.Module:
    """Projector(s) + network of preset ``name`` for condition tokens of width ``cond_dim`` over ``latent``."""
    arch = denoiser_arch(name, overrides)
    family = DENOISERS[name].module
    if family.LATENT_KIND != latent.kind:
        raise ConfigError(f"denoiser '{name}' needs a {family.LATENT_KIND} latent space but model.latent is "
                          f"{latent.kind}: use a {'VQ' if family.LATENT_KIND == 'discrete' else 'continuous'} latent")
    with _config_errors():
        return family.build(arch, cond_dim, latent)


def init_device(cfg: RunConfig, device: str | torch.device) -> str | torch.device | None:
    """Where a run on ``device`` draws its random initial weights: there with ``model.init_on_device``, else on the
    CPU (None), so that a seed gives the same start on every device."""
    return device if cfg.model.init_on_device else None


def build_enhancer(cfg: RunConfig, device: str | torch.device | None = None) -> Enhancer:
    """Backbone, latent space, a fresh head and the objective as ``cfg`` names them; nothing frozen or adapted yet.

    ``device``: where random weights are drawn (the head; the backbone with ``model.random_init``), instead of the
    CPU. Pretrained weights load on the CPU, and the latent space is built there, then moved. ``device="meta"``
    builds without storage (parameter and FLOP counts at any size; needs ``model.random_init``). The build order
    (backbone, latent space, head) fixes which weights a seed gives on a device.
    """
    on_device = (lambda: torch.device(device)) if device is not None else nullcontext
    with on_device() if cfg.model.random_init else nullcontext():
        backbone = build_backbone(cfg.model)
    latent = build_latent_space(cfg.model)  # diffusers cannot build inside a meta context: moved below
    latent.check_image_size(backbone.image_size)
    with on_device():
        head = build_head(cfg.model.denoiser, cfg.model.denoiser_arch, backbone.cond_dim, latent)
    with _config_errors():
        head.check_target(latent.target_shape(backbone.image_size))
    head.denoiser.grad_checkpointing = cfg.train.grad_checkpointing
    n_local = round(cfg.model.local_ratio * backbone.num_patches) if cfg.model.condition == "cls+local" else 0
    latent = latent if device is None else latent.to(device)
    enh = Enhancer(backbone, latent, head, OBJECTIVES[latent.kind](cfg.objective), n_local)
    enh.frozen_bf16 = cfg.train.frozen_bf16
    return enh


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
