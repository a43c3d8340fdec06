"""Typed run configuration: dataclasses whose defaults are the paper's recipe, plus one YAML / CLI override layer.

A run is described by :class:`RunConfig`. ``load_config(yaml_path, ["train.lr=3e-4", ...])`` builds it from the
defaults, a YAML file and ``section.key=value`` overrides; unknown keys and wrongly typed values raise
:class:`ConfigError` with a one-line message naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError  # also the name other modules import from here


@dataclass
class ModelConfig:
    """What is enhanced and by which generative model."""

    backbone: str = "openai-clip-vit-l-14-224"  # registered preset, local save_pretrained dir, or cached hub id
    weights: str | None = None  # local dir or hub id holding a preset's weights (default: the preset's hub id)
    random_init: bool = False  # build the backbone from its config with random weights (tests, benchmarks)
    init_on_device: bool = False  # draw random initial weights on the run's device, not the CPU: fast on a GPU, other weights per seed
    condition: str = "cls"  # "cls": global token only (paper); "cls+local": plus a share of patch tokens (Fig. 5)
    local_ratio: float = 1.0  # share of patch tokens that join the condition in "cls+local"
    latent: str = "flux-vae"  # latent space: see genhancer.latents.LATENT_SPACES
    latent_path: str | None = None  # weights of the autoencoder / VQ model
    latent_downsample: int = 1  # "pixel" latent space only: average-pool the image by this factor
    denoiser: str = "flux-paper"  # preset name: see genhancer.denoisers.DENOISERS
    denoiser_arch: dict = field(default_factory=dict)  # per-field overrides of the preset's architecture


@dataclass
class ObjectiveConfig:
    """How reconstruction targets are corrupted."""

    timestep_sampling: str = "logit-normal"  # objectives.flow.TIMESTEP_SCHEDULES: "logit-normal" (Eq. 6), "uniform"
    logit_normal_scale: float = 1.0  # s in t = sigmoid(m + s * eps)
    logit_normal_mean: float = 0.0  # m: 0 in the paper; > 0 samples nearer t = 1 (pure noise)
    uniform_share: float = 0.0  # share of timesteps drawn from U[0, 1] instead (0 in the paper): covers the ends
    mask_sampling: str = "uniform"  # discrete: a key of objectives.masked.MASK_RATIOS; "uniform": r ~ U[min, max]
    mask_ratio_min: float = 0.5  # discrete denoiser: per-sample mask ratio ~ U[min, max] (paper: 50-90%)
    mask_ratio_max: float = 0.9
    mask_ratio: float | None = None  # fixed mask ratio instead of the rule (Table 8)
    choice_temperature: float = 4.5  # discrete previews: MaskGIT's re-masking temperature (annealed to 0)


@dataclass
class StageConfig:
    """Which parameters learn: the paper's two stages, or end to end."""

    stage: str = "stage1"  # "stage1": encoder frozen; "stage2": encoder tuned; "e2e": everything from step 0
    init_from: str | None = None  # stage 2: stage-1 run dir or checkpoint to take projector + denoiser from
    finetune: str = "lora"  # "lora" or "full" tuning of the vision encoder (Fig. 8)
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    train_head: bool = False  # stage 2: also train projector + denoiser ("all" in Fig. 9) instead of freezing them


@dataclass
class OptimConfig:
    """AdamW with constant learning rate after a linear warm-up."""

    lr: float | None = None  # default: 1e-4 in stage 1, 1e-5 in stage 2 and e2e
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 10
    grad_clip: float = 1.0
    fused: bool | None = None  # fused AdamW: default on when the device has it


@dataclass
class DataConfig:
    """Where training images come from and how they are cropped."""

    source: str = "webdataset"  # "webdataset" shards, "folder" of images, "synthetic", or "cache" (genhancer cache)
    path: str | None = None  # shard pattern / directory / cache dir
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop scale
    num_workers: int = 4
    prefetch_factor: int = 2
    synthetic_size: int = 256  # number of images of the synthetic source
    max_skip_fraction: float = 0.05  # stop if more than this share of samples is unreadable


@dataclass
class TrainConfig:
    """Batching, budget, precision, logging and checkpoints."""

    output_dir: str = "runs/genhancer"
    batch_size: int = 16  # per device
    grad_accum: int = 2
    max_steps: int | None = None  # optimizer steps; None: one epoch of the dataset
    epochs: int = 1
    precision: str = "bf16"  # "bf16", "fp16" or "fp32"
    frozen_bf16: bool = False  # run the frozen encoders (autoencoder; vision encoder in stage 1) in bf16 in an fp32 step
    seed: int = 0
    log_every: int = 10
    save_every: int = 1000
    keep_last: int = 3
    resume: bool = False
    compile: bool = False  # torch.compile the denoiser
    grad_checkpointing: bool = False  # recompute denoiser blocks and encoder layers in backward
    max_consecutive_nonfinite: int = 10  # stop after this many skipped steps in a row
    trackers: list = field(default_factory=lambda: ["tensorboard"])


@dataclass
class RunConfig:
    """One training run of one stage."""

    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def lr(self) -> float:
        if self.optim.lr is not None:
            return self.optim.lr
        return 1e-4 if self.stage.stage == "stage1" else 1e-5


def to_dict(cfg: Any) -> dict:
    """Nested plain dict of a config dataclass (tuples as lists, for YAML / JSON)."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(data: dict, cls: type = RunConfig, prefix: str = "") -> Any:
    """Build ``cls`` from a nested dict, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(_unknown(prefix + str(key), list(fields), prefix))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(value or {}, hint, prefix + key + ".")
        else:
            kwargs[key] = _coerce(value, hint, prefix + key)
    return cls(**kwargs)


def _unknown(key: str, choices: list[str], prefix: str) -> str:
    leaf = key[len(prefix):]
    close = difflib.get_close_matches(leaf, choices, n=1)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(prefix + c for c in choices)}"
    return f"unknown config key '{key}': {hint}"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint, converting the lossless cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"'{key}' must not be empty")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"'{key}' must be a list of {len(args)} values, e.g. {key}=[0.9,1.0]; got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if hint in (list, dict) or origin in (list, dict):
        want = origin or hint
        if not isinstance(value, want):
            raise ConfigError(f"'{key}' must be a {want.__name__}, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return str(value)
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4), values parsed as YAML scalars / lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value, e.g. train.max_steps=100")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads '1e-4' as a string
    return key.strip().split("."), value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _merge(base: dict, path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{'.'.join(path)}' sets a key inside a non-mapping value")
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None,
                check: bool = True) -> RunConfig:
    """Defaults <- ``base`` dict <- YAML file <- ``section.key=value`` overrides, then validated (``check``) with the
    data source detected (:func:`detect_source`)."""
    data: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' not found: pass the path of a YAML recipe (see `genhancer recipes`)")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections (model:, train:, ...)")
        for section, values in loaded.items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section] = {**data[section], **values}
            else:
                data[section] = values
    for text in overrides:
        keys, value = parse_override(text)
        _merge(data, keys, value)
    cfg = from_dict(data)
    if check:
        detect_source(cfg.data)
        validate(cfg)
    return cfg


def detect_source(d: DataConfig) -> None:
    """A directory of image files given as webdataset shards (the default source) is read as a folder of images."""
    root = Path(d.path or "")
    if d.source != "webdataset" or not d.path or not root.is_dir() or next(root.rglob("*.tar"), None):
        return
    from .images import IMAGE_EXTENSIONS  # here: it imports torch

    if next((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS), None) is None:
        raise ConfigError(f"data.path '{root}' holds neither .tar shards nor image files: point it at shards "
                          f"(data.source=webdataset) or at a folder of images (data.source=folder)")
    d.source = "folder"


def validate(cfg: RunConfig) -> None:
    """Reject impossible values before any heavy work."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    m, o, s, op, d, t = cfg.model, cfg.objective, cfg.stage, cfg.optim, cfg.data, cfg.train
    need(m.condition in ("cls", "cls+local"), f"model.condition must be 'cls' or 'cls+local', got '{m.condition}'")
    need(0.0 < m.local_ratio <= 1.0, f"model.local_ratio must be in (0, 1], got {m.local_ratio}")
    need(m.latent_downsample >= 1, f"model.latent_downsample must be >= 1, got {m.latent_downsample}")
    from .objectives import MASK_RATIOS, TIMESTEP_SCHEDULES  # here: the registries import torch

    for key, registry in (("timestep_sampling", TIMESTEP_SCHEDULES), ("mask_sampling", MASK_RATIOS)):
        need(getattr(o, key) in registry, f"objective.{key} must be one of {', '.join(map(repr, registry))}, "
                                          f"got '{getattr(o, key)}'")
    need(o.logit_normal_scale > 0, f"objective.logit_normal_scale must be > 0, got {o.logit_normal_scale}")
    need(0.0 <= o.uniform_share <= 1.0, f"objective.uniform_share must be in [0, 1], got {o.uniform_share}")
    for name in ("mask_ratio_min", "mask_ratio_max", "mask_ratio"):
        v = getattr(o, name)
        need(v is None or 0.0 < v < 1.0, f"objective.{name} must be in (0, 1), got {v}")
    need(o.mask_ratio_min <= o.mask_ratio_max, "objective.mask_ratio_min must not exceed objective.mask_ratio_max")
    need(o.choice_temperature >= 0, f"objective.choice_temperature must be >= 0, got {o.choice_temperature}")
    need(s.stage in ("stage1", "stage2", "e2e"), f"stage.stage must be 'stage1', 'stage2' or 'e2e', got '{s.stage}'")
    need(s.finetune in ("lora", "full"), f"stage.finetune must be 'lora' or 'full', got '{s.finetune}'")
    need(s.lora_r >= 1, f"stage.lora_r must be >= 1, got {s.lora_r}")
    need(s.lora_alpha > 0, f"stage.lora_alpha must be > 0, got {s.lora_alpha}")
    need(0.0 <= s.lora_dropout < 1.0, f"stage.lora_dropout must be in [0, 1), got {s.lora_dropout}")
    need(cfg.lr > 0, f"optim.lr must be > 0, got {cfg.lr}")
    need(op.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {op.warmup_steps}")
    need(op.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables clipping), got {op.grad_clip}")
    need(d.source in ("webdataset", "folder", "synthetic", "cache"),
         f"data.source must be 'webdataset', 'folder', 'synthetic' or 'cache', got '{d.source}'")
    need(d.source == "synthetic" or d.path, f"data.path is required for data.source={d.source}: set data.path=DIR")
    need(0.0 < d.crop_scale[0] <= d.crop_scale[1] <= 1.0, f"data.crop_scale must satisfy 0 < lo <= hi <= 1, got {d.crop_scale}")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    need(d.synthetic_size >= 1, f"data.synthetic_size must be >= 1, got {d.synthetic_size}")
    need(0.0 <= d.max_skip_fraction <= 1.0, f"data.max_skip_fraction must be in [0, 1], got {d.max_skip_fraction}")
    need(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    need(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    need(t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}")
    need(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    need(t.precision in ("bf16", "fp16", "fp32"), f"train.precision must be 'bf16', 'fp16' or 'fp32', got '{t.precision}'")
    need(t.save_every >= 1, f"train.save_every must be >= 1, got {t.save_every}")
    need(t.keep_last >= 1, f"train.keep_last must be >= 1, got {t.keep_last}")
    need(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    need(t.max_consecutive_nonfinite >= 1, f"train.max_consecutive_nonfinite must be >= 1, got {t.max_consecutive_nonfinite}")
    _validate_optimizer(op)


def _validate_optimizer(op: OptimConfig) -> None:
    """AdamW's own checks, as one-line errors before any model is built (torch raises them only when the optimizer
    is created, after the models are loaded)."""
    b1, b2 = op.betas
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ConfigError(f"optim.betas must both be in [0, 1), e.g. optim.betas=[0.9,0.999]; got {list(op.betas)}")
    if op.eps < 0:
        raise ConfigError(f"optim.eps must be >= 0 (the default is 1e-8), got {op.eps}")
    if op.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay must be >= 0 (the default is 0.01), got {op.weight_decay}")
