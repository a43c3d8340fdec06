"""The one adapter over transformers' CLIP-family models, and the registry of the paper's backbones.

``VisionBackbone`` wraps a whole ``CLIPModel`` / ``SiglipModel`` (the text tower is kept so that an export is the
same kind of model as its source) and turns image crops in [0, 1] into condition tokens ``(B, 1 + K, D)``:
the global token first (CLIP / MetaCLIP: ``visual_projection(pooler_output)``; SigLIP: ``pooler_output``), then
K local patch tokens mapped into the same space (CLIP: ``visual_projection(post_layernorm(h))``; SigLIP: the
post-normalised patch states).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .errors import ConfigError

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackbonePreset:
    """A registered backbone: its architecture config (shipped), the hub id of its weights and their licence (the
    hub's licence identifier, when the weights' model card declares one)."""

    name: str
    hub_id: str
    config: dict
    license: str | None = None

    @property
    def family(self) -> str:
        return self.config["model_type"]


def _load_presets() -> dict[str, BackbonePreset]:
    presets = {}
    for entry in resources.files("genhancer").joinpath("configs", "backbones").iterdir():
        if entry.name.endswith(".json"):
            cfg = json.loads(entry.read_text())
            name = entry.name[:-5]
            presets[name] = BackbonePreset(name, cfg.pop("_hub_id"), cfg, cfg.pop("_license", None))
    return dict(sorted(presets.items()))


BACKBONES = _load_presets()


def _classes(family: str):
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    if family == "clip":
        return CLIPConfig, CLIPModel
    if family == "siglip":
        return SiglipConfig, SiglipModel
    tower = " (a vision tower alone: give the whole model's folder)" if family.endswith("_vision_model") else ""
    raise ConfigError(f"model type '{family}' is not a CLIP or SigLIP model{tower}: genhancer enhances CLIPModel / "
                      "SiglipModel")


def build_from_config(config: dict) -> nn.Module:
    """A randomly initialised CLIPModel / SiglipModel from a config dict (works under ``torch.device('meta')``)."""
    cfg_cls, model_cls = _classes(config["model_type"])
    return model_cls(cfg_cls.from_dict(config))


def resolve_source(cfg: ModelConfig) -> str:
    """The local directory or hub id whose weights (and processor files) the run starts from."""
    if cfg.backbone in BACKBONES:
        return cfg.weights or BACKBONES[cfg.backbone].hub_id
    return cfg.weights or cfg.backbone


def architecture(config: dict) -> str:
    """A CLIP-family config in a few words, e.g. 'clip ViT 24 x 1024, patch 14, 224px, projection 768'."""
    cfg_cls, _ = _classes(config["model_type"])
    full = cfg_cls.from_dict(config)  # the defaults of keys a hub config leaves out
    v = full.vision_config
    proj = f", projection {full.projection_dim}" if hasattr(full, "projection_dim") else ""
    return (f"{full.model_type} ViT {v.num_hidden_layers} x {v.hidden_size}, patch {v.patch_size}, "
            f"{v.image_size}px{proj}")


def check_weights(cfg: ModelConfig, config: dict) -> None:
    """Refuse ``model.weights`` of another architecture than the preset ``model.backbone`` (the run, its checkpoints
    and the export's model card would name the preset)."""
    preset = BACKBONES.get(cfg.backbone)
    if preset is None or not cfg.weights or architecture(config) == architecture(preset.config):
        return
    raise ConfigError(f"model.weights '{cfg.weights}' is a {architecture(config)}, not the preset {cfg.backbone} "
                      f"({architecture(preset.config)}): give your model as model.backbone={cfg.weights} and leave "
                      "model.weights unset")


def load_clip_family(cfg: ModelConfig) -> nn.Module:
    """The CLIPModel / SiglipModel named by ``cfg``, loaded offline (or random from its config)."""
    if cfg.random_init:
        if cfg.backbone in BACKBONES:
            return build_from_config(BACKBONES[cfg.backbone].config)
        return build_from_config(_read_config(cfg.backbone))
    source = resolve_source(cfg)
    config = _read_config(source)
    check_weights(cfg, config)
    _, model_cls = _classes(config["model_type"])
    try:
        return model_cls.from_pretrained(source, local_files_only=True)
    except OSError as e:
        raise ConfigError(f"weights of '{source}' could not be loaded offline ({_first_line(e)}): "
                          "download them first and pass model.weights=DIR") from None


def _read_config(source: str) -> dict:
    """config.json of a local dir or of a hub id in the local Hugging Face cache."""
    path = Path(source) / "config.json"
    if not path.is_file():
        if Path(source).exists():
            raise ConfigError(f"'{source}' has no config.json: point model.backbone at a save_pretrained "
                              f"CLIP/SigLIP folder or one of: {', '.join(BACKBONES)}")
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "config.json", local_files_only=True))
        except Exception:
            hint = "model.weights=DIR" if source else "model.backbone=DIR"
            raise ConfigError(f"'{source}' is neither a local folder nor in the Hugging Face cache (offline): "
                              f"download it where there is network (`hf download {source}`) or set {hint}; "
                              f"registered backbones: {', '.join(BACKBONES)}") from None
    config = json.loads(path.read_text())
    if not isinstance(config, dict) or "model_type" not in config:
        kind = config.get("_class_name", "non-transformers") if isinstance(config, dict) else "non-transformers"
        raise ConfigError(f"'{source}' is not a CLIP/SigLIP folder (its config.json describes {kind}): "
                          "model.backbone and model.weights take a CLIPModel / SiglipModel folder (an autoencoder's "
                          "folder goes to model.latent_path)")
    return config


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


class VisionBackbone(nn.Module):
    """Condition tokens of a CLIP-family vision encoder, with its own input normalisation."""

    def __init__(self, model: nn.Module, mean=None, std=None):
        super().__init__()
        self.model = model
        self.family = model.config.model_type
        vcfg = model.config.vision_config
        self.image_size, self.patch_size = int(vcfg.image_size), int(vcfg.patch_size)
        default_mean, default_std = (CLIP_MEAN, CLIP_STD) if self.family == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
        self.register_buffer("mean", torch.tensor(mean or default_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or default_std).view(1, 3, 1, 1), persistent=False)

    @property
    def vision(self) -> nn.Module:
        return self.model.vision_model

    @property
    def cond_dim(self) -> int:
        if self.family == "clip":
            return int(self.model.config.projection_dim)
        return int(self.model.config.vision_config.hidden_size)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def forward(self, images: torch.Tensor, local: bool = False) -> torch.Tensor:
        """images: (B, 3, S, S) in [0, 1] -> the global token (B, 1, D), followed by every patch token in the same
        space when ``local`` (B, 1 + N, D); ``genhancer.enhancer.select_condition`` picks the condition from them."""
        x = (images - self.mean) / self.std
        out = self.vision(pixel_values=x)
        if self.family == "clip":
            tokens = [self.model.visual_projection(out.pooler_output)[:, None]]
        else:
            tokens = [out.pooler_output[:, None]]
        if local:
            patches = out.last_hidden_state
            if self.family == "clip":
                patches = self.model.visual_projection(self.vision.post_layernorm(patches[:, 1:]))
            tokens.append(patches)
        return torch.cat(tokens, dim=1)

    def check_image_size(self, size: int) -> None:
        if size != self.image_size:
            raise ConfigError(f"the backbone takes {self.image_size}px images, not {size}px: "
                              "use the backbone's own resolution (a preset of the other resolution for 224/336/384)")


def processor_stats(source: str) -> tuple[tuple | None, tuple | None]:
    """image_mean / image_std from a source's preprocessor_config.json, when it has one locally."""
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        return None, None
    cfg = json.loads(path.read_text())
    return tuple(cfg.get("image_mean") or ()) or None, tuple(cfg.get("image_std") or ()) or None


def build_backbone(cfg: ModelConfig) -> VisionBackbone:
    """The adapter around the model named by ``cfg``."""
    model = load_clip_family(cfg)
    mean, std = processor_stats(resolve_source(cfg)) if not cfg.random_init else (None, None)
    return VisionBackbone(model, mean, std)


def vision_linear_names(backbone: VisionBackbone) -> list[str]:
    """Names (relative to ``backbone.vision``) of every nn.Linear of the vision encoder: LoRA's targets."""
    return [name for name, m in backbone.vision.named_modules() if isinstance(m, nn.Linear)]
