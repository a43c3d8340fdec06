"""How much the reconstruction objective pays for each attribute: the gate for every design choice of the world.

GenHancer can only teach an encoder what the denoiser's loss rewards. This module measures that reward directly.
A stage-1 denoiser is trained on an *oracle* condition (the scene's true attributes as one-hot codes, plus its
nuisance factors), then evaluated on val scenes with one attribute of the condition swapped to another value,
pixels and noise draws unchanged. The relative rise of the loss is the **swap cost** of that attribute: what an
encoder that does not carry it would pay. An attribute with zero swap cost cannot be improved by reconstruction,
whatever else is tuned.

The same stage-1 recipe is also trained on the real encoder's global token and on a condition of zeros: how
much the encoder's condition is worth (its loss against zeros), and how much the head relies on it (its loss with
another scene's condition). With ``encoder_swaps``, each attribute is also swapped in the *image* (the twin scene
is rendered and encoded): what the trained head reads of that attribute through the real encoder.

Everything runs from tensors in memory (no data loader), single-threaded, in a few minutes on 2 cores.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from genhancer.latents import PixelSpace
from genhancer.miniworld import demo
from genhancer.miniworld.scenes import (ATTRIBUTES, SHAPES, SPLITS, Scene, other_value, render_many, sample_nuisance,
                                        scene_from_seed)

NUISANCE = ("background", "shift")


@dataclass(frozen=True)
class IncentiveRecipe:
    """A stage-1 configuration to measure (``stage1_of(demo.FULL)`` is the demo's)."""

    train_images: int = 2000
    val_images: int = 256
    steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 10
    size: int = 64
    latent_downsample: int = 2
    denoiser: str = "flux-mini"
    denoiser_arch: dict = field(default_factory=dict)
    timestep_sampling: str = "logit-normal"
    logit_normal_mean: float = 1.0
    logit_normal_scale: float = 1.0
    repeats: int = 4  # noise draws per val scene
    seed: int = 0

    @classmethod
    def stage1_of(cls, recipe) -> "IncentiveRecipe":
        """The stage 1 of a demo ``Recipe``."""
        return cls(train_images=recipe.train_images, steps=recipe.stage1_steps, batch_size=recipe.batch_size,
                   lr=recipe.stage1_lr, latent_downsample=recipe.latent_downsample, denoiser=recipe.denoiser,
                   logit_normal_mean=recipe.logit_normal_mean, logit_normal_scale=recipe.logit_normal_scale)

    def with_(self, **changes) -> "IncentiveRecipe":
        return replace(self, **changes)


DEMO = IncentiveRecipe.stage1_of(demo.FULL)
FAST = DEMO.with_(train_images=64, val_images=16, steps=20, repeats=1)  # a smoke test: numbers meaningless


def oracle_condition(scenes: list[Scene]) -> torch.Tensor:
    """(N, 1, D): one-hot codes of every attribute and the shape, then the nuisance factors (scaled to ~[-1, 1])."""
    rows = []
    for s in scenes:
        codes = [np.eye(len(vals))[vals.index(getattr(s, a))] for a, vals in ATTRIBUTES.items()]
        codes.append(np.eye(len(SHAPES))[SHAPES.index(s.shape)])
        nuisance = [(np.array(s.background) - 222.5) / 32.5, np.array(s.shift) / 0.05, np.array(s.tint) / 20.0]
        rows.append(np.concatenate(codes + nuisance))
    return torch.tensor(np.stack(rows), dtype=torch.float32)[:, None]


def _pixels(scenes: list[Scene], size: int) -> torch.Tensor:
    return torch.from_numpy(render_many(scenes, size)).permute(0, 3, 1, 2).float() / 255


def _model(recipe: IncentiveRecipe, cond_dim: int):
    """A fresh head (projectors + network) and the rectified-flow objective of ``recipe``."""
    from genhancer.config import ObjectiveConfig
    from genhancer.enhancer import build_head
    from genhancer.objectives import RectifiedFlow

    objective = RectifiedFlow(ObjectiveConfig(timestep_sampling=recipe.timestep_sampling,
                                              logit_normal_mean=recipe.logit_normal_mean,
                                              logit_normal_scale=recipe.logit_normal_scale))
    torch.manual_seed(recipe.seed)
    return build_head(recipe.denoiser, recipe.denoiser_arch, cond_dim, PixelSpace(recipe.latent_downsample)), objective


def train_head(recipe: IncentiveRecipe, cond: torch.Tensor, target: torch.Tensor):
    """(head, objective): a stage-1 head trained on fixed (condition, target) pairs with the trainer's optimiser
    settings (AdamW, linear warm-up, gradient clipping at 1)."""
    head, objective = _model(recipe, cond.shape[-1])
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=recipe.lr, betas=(0.9, 0.999), weight_decay=0.01)
    g = torch.Generator().manual_seed(recipe.seed)
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = recipe.lr * min(1.0, (step + 1) / recipe.warmup)
        idx = torch.randint(len(target), (recipe.batch_size,), generator=g)
        draws = objective.draw(recipe.batch_size, tuple(target.shape[1:]), g)
        loss = objective.loss(head, target[idx], cond[idx], draws).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
    return head.eval(), objective


@torch.no_grad()
def val_loss(model, target: torch.Tensor, cond: torch.Tensor, repeats: int, seed: int = 1) -> float:
    """Mean loss of ``model`` = (head, objective) over ``repeats`` fixed noise draws (the same draws for every
    condition compared)."""
    head, objective = model
    total = 0.0
    for r in range(repeats):
        draws = objective.draw(len(target), tuple(target.shape[1:]), torch.Generator().manual_seed(seed + r))
        total += objective.loss(head, target, cond, draws).mean().item() / repeats
    return total


def _swapped(scenes: list[Scene], attribute: str, rng: np.random.Generator) -> list[Scene]:
    """The scenes with ``attribute`` (or a nuisance factor) changed, everything else kept."""
    if attribute in NUISANCE:
        return [s.with_(**{attribute: sample_nuisance(rng)[attribute]}) for s in scenes]
    return [s.with_(**{attribute: other_value(s, attribute, rng)}) for s in scenes]


@torch.no_grad()
def _encode(backbone, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) in [0, 1] -> the backbone's global-token condition (N, 1, D)."""
    return torch.cat([backbone(pixels[i:i + 256]) for i in range(0, len(pixels), 256)])


def measure(recipe: IncentiveRecipe = DEMO, encoder: str | None = None, encoder_swaps: bool = True,
            progress=print) -> dict:
    """Swap costs (%) of the oracle condition and, given ``encoder`` (a CLIP folder), the encoder's condition value.

    Returns ``{"recipe", "oracle": {"own_loss", "other_scene", "swap": {attr: %}}, "encoder": {...}}``.
    """
    train = [scene_from_seed(SPLITS["train"] + i) for i in range(recipe.train_images)]
    val = [scene_from_seed(SPLITS["val"] + i) for i in range(recipe.val_images)]
    latent = PixelSpace(recipe.latent_downsample)
    train_px, val_px = _pixels(train, recipe.size), _pixels(val, recipe.size)
    train_t, val_t = latent.encode(train_px * 2 - 1), latent.encode(val_px * 2 - 1)
    rng = np.random.default_rng(recipe.seed + 7)
    perm = torch.from_numpy(rng.permutation(len(val)))
    result: dict = {"recipe": asdict(recipe)}

    progress(f"incentive: training the oracle-conditioned head ({recipe.steps} steps)")
    head = train_head(recipe, oracle_condition(train), train_t)
    cond = oracle_condition(val)
    own = val_loss(head, val_t, cond, recipe.repeats)
    swaps = {a: val_loss(head, val_t, oracle_condition(_swapped(val, a, rng)), recipe.repeats) for a in
             list(ATTRIBUTES) + list(NUISANCE)}
    result["oracle"] = {"own_loss": own, "other_scene": _pct(val_loss(head, val_t, cond[perm], recipe.repeats), own),
                        "swap": {a: _pct(v, own) for a, v in swaps.items()}}
    if encoder is not None:
        progress("incentive: training heads on the encoder's condition and on zeros")
        from genhancer.backbones import build_backbone
        from genhancer.config import ModelConfig

        backbone = build_backbone(ModelConfig(backbone=encoder)).eval()
        enc_train, enc_val = _encode(backbone, train_px), _encode(backbone, val_px)
        head = train_head(recipe, enc_train, train_t)
        zeros = train_head(recipe, torch.zeros_like(enc_train), train_t)
        own = val_loss(head, val_t, enc_val, recipe.repeats)
        enc = {"own_loss": own, "zeros_loss": val_loss(zeros, val_t, torch.zeros_like(enc_val), recipe.repeats)}
        enc["gain_over_zeros"] = _pct(enc["zeros_loss"], own)
        enc["other_scene"] = _pct(val_loss(head, val_t, enc_val[perm], recipe.repeats), own)
        if encoder_swaps:
            enc["swap"] = {a: _pct(val_loss(head, val_t, _encode(
                backbone, _pixels(_swapped(val, a, rng), recipe.size)), recipe.repeats), own) for a in ATTRIBUTES}
        result["encoder"] = enc
    return result


@torch.no_grad()
def read_costs(run_dir: str | Path, n: int = 256, repeats: int = 2, split: str = "val") -> dict:
    """What a trained run's head reads through its own encoder: its loss on ``n`` scenes of ``split`` with each
    scene's own condition, then (in % above it) with another scene's condition and with the condition of the scene
    with one attribute changed in the image (the twin rendered and encoded; target and noise unchanged).

    On a stage-1 run this is the base encoder's condition under the stage-1 head; on a stage-2 run, the tuned
    encoder's condition under the same (frozen) head. Cheap: nothing is trained.
    """
    from genhancer.reconstruct import load_enhancer

    enh = load_enhancer(run_dir).eval()
    size = enh.image_size
    rng = np.random.default_rng(0)
    scenes = [scene_from_seed(SPLITS[split] + 5_000_000 + i) for i in range(n)]
    pixels = _pixels(scenes, size)
    target = enh.target({"pixels": pixels})
    model = (enh.head, enh.objective)
    cond = enh.condition({"pixels": pixels}, None)
    own = val_loss(model, target, cond, repeats)
    perm = torch.from_numpy(rng.permutation(n))
    swap = {a: _pct(val_loss(model, target, enh.condition({"pixels": _pixels(_swapped(scenes, a, rng), size)}, None),
                             repeats), own) for a in list(ATTRIBUTES) + list(NUISANCE)}
    return {"own_loss": own, "other_scene": _pct(val_loss(model, target, cond[perm], repeats), own), "swap": swap}


def _pct(loss: float, reference: float) -> float:
    return 100.0 * (loss - reference) / reference if reference > 0 and math.isfinite(loss) else float("nan")


def table(rows: dict[str, dict]) -> str:
    """Markdown: one row per named result that has a loss (``measure``'s oracle / encoder, ``read_costs``): its own
    loss, then the loss increase (%) with another scene's condition and with each attribute swapped."""
    keys = list(ATTRIBUTES) + list(NUISANCE)
    lines = ["| condition | own loss | other scene | " + " | ".join(keys) + " |", "|---" * (len(keys) + 3) + "|"]
    for name, r in rows.items():
        if not isinstance(r, dict) or "own_loss" not in r:
            continue
        swap = r.get("swap", {})
        cells = [f"{swap[k]:+.1f}" if k in swap else "" for k in keys]
        extra = f" (zeros {r['zeros_loss']:.4f}: {r['gain_over_zeros']:+.1f}%)" if "zeros_loss" in r else ""
        lines.append(f"| {name} | {r['own_loss']:.4f}{extra} | {r['other_scene']:+.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
