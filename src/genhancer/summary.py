"""What a run built, in a few lines printed before its first step (``genhancer train`` and every library run)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator

from .backbones import resolve_source
from .backends import tracker_available
from .config import RunConfig
from .enhancer import Enhancer, init_device
from .threads import cpu_bf16

LARGE_FOR_CPU = 100_000_000  # denoiser parameters above which a CPU run gets a note


def _count(params) -> int:
    return sum(p.numel() for p in params)


def own(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The module's parameters without the LoRA adapters added to it."""
    return [p for n, p in module.named_parameters() if "lora_" not in n]


def _images(cfg: RunConfig, epoch_size: int | None, global_batch: int) -> str:
    d = cfg.data
    if d.source == "folder":
        from .images import image_files

        return f"{len(image_files(Path(d.path))):,} image files under {d.path} (data.source=folder)"
    if d.source == "synthetic":
        return f"{d.synthetic_size:,} synthetic images (data.source=synthetic)"
    if d.source == "webdataset":
        from .data import ShardSource

        return f"{len(ShardSource(d.path).shards):,} .tar shards at {d.path} (image count unknown until read)"
    return f"{(epoch_size or 0) * global_batch:,} cached samples per epoch in {d.path} (data.source=cache)"


def _steps(cfg: RunConfig, epoch_size: int | None, step: int, total: int) -> str:
    done = f", resuming at step {step}" if step else ""
    if epoch_size is None:
        return f"{total:,} optimizer steps{done} (train.max_steps)"
    epochs = total * cfg.train.grad_accum / epoch_size
    return f"{total:,} optimizer steps = {epochs:.3g} epoch(s) of {epoch_size:,} micro-batches{done}"


def notes(cfg: RunConfig, acc: Accelerator, head_params: int) -> list[str]:
    """What is off or worth changing, one line each."""
    t, out = cfg.train, []
    missing = [x for x in t.trackers if not tracker_available(x)]
    if missing:
        out.append(f"tracker(s) {', '.join(missing)} not installed: metrics go to metrics.jsonl only "
                   f"(pip install {' '.join(missing)}, or train.trackers=[] to drop them)")
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    wanted = "no" if t.precision == "fp32" else t.precision
    if launched and launched != wanted:
        out.append(f"the accelerate config's mixed_precision={launched} is overridden by train.precision={t.precision}"
                   f" (set train.precision to change it)")
    if acc.device.type == "cpu":
        bf16 = (f"train.precision={t.precision}" if t.precision != "fp32"
                else "train.frozen_bf16=true" if t.frozen_bf16 else None)  # (frozen_bf16 acts in an fp32 step only)
        if bf16 and not cpu_bf16():
            out.append(f"{bf16} on a CPU without bf16 instructions: torch emulates every bf16 product (35x slower "
                       f"than fp32 measured on the tiny preset); train.precision=fp32 train.frozen_bf16=false is fast")
        elif t.precision != "fp32":
            out.append(f"CPU run in {t.precision}: train.precision=fp32 is usually faster on CPU")
        if head_params > LARGE_FOR_CPU:
            out.append(f"CPU run with model.denoiser={cfg.model.denoiser} ({head_params / 1e6:,.0f} M parameters): a "
                       f"small preset such as model.denoiser=flux-tiny fits a CPU (`genhancer info` lists sizes)")
    return out


def _head_origin(cfg: RunConfig, acc: Accelerator) -> str:
    """Where the head's starting weights come from: the stage-1 run, or drawn from the seed (and where: the same
    seed gives other weights on a GPU with ``model.init_on_device``)."""
    if cfg.stage.init_from:
        return f"weights from {cfg.stage.init_from}"
    device = init_device(cfg, acc.device)
    where = "the CPU" if device is None or device.type == "cpu" else f"{device} (model.init_on_device)"
    return f"drawn on {where} from train.seed={cfg.train.seed}"


def describe_run(cfg: RunConfig, enh: Enhancer, acc: Accelerator, loader, step: int, total: int,
                 run: Path) -> str:
    """The run's summary: backbone, trainable parameters, denoiser, latent space, images, steps, device, output."""
    m, t = cfg.model, cfg.train
    model = enh.backbone.model
    head_params = _count(enh.head.parameters())
    world = acc.num_processes
    lora = _count(p for n, p in model.named_parameters() if "lora_" in n)
    lora = f" (+{lora:,} LoRA)" if lora else ""
    weights = "" if m.random_init or resolve_source(m) == m.backbone else f"; weights from {resolve_source(m)}"
    device = f"{acc.device}" + (f" x {world} processes" if world > 1 else "")
    if acc.device.type == "cpu":
        device += f", {torch.get_num_threads()} torch thread(s)"
    lines = [
        f"backbone    {m.backbone} ({enh.backbone.family}, {enh.image_size}px): {_count(own(model)):,} "
        f"parameters, vision tower {_count(own(enh.backbone.vision)):,}{lora}{weights}",
        f"trainable   {_count(p for p in enh.parameters() if p.requires_grad):,} parameters ({cfg.stage.stage}"
        f"{', ' + cfg.stage.finetune + ' on the encoder' if cfg.stage.stage != 'stage1' else ', encoder frozen'})",
        f"denoiser    {m.denoiser}: {head_params:,} parameters with its projectors; condition {m.condition}; "
        f"{_head_origin(cfg, acc)}",
        f"latent      {m.latent}, target {tuple(enh.target_shape)}",
        f"images      {_images(cfg, loader.epoch_size, t.batch_size * world)}",
        f"steps       {_steps(cfg, loader.epoch_size, step, total)}; global batch "
        f"{t.batch_size * world * t.grad_accum} ({t.batch_size} x {world} x {t.grad_accum})",
        f"device      {device}; precision {t.precision}",
        f"output      {run}",
    ]
    return "\n".join(lines + [f"note        {n}" for n in notes(cfg, acc, head_params)])


def print_summary(cfg: RunConfig, enh: Enhancer, acc: Accelerator, loader, step: int, total: int, run: Path) -> None:
    """Print :func:`describe_run` on the main process (the others skip the work, e.g. listing an image folder)."""
    if acc.is_main_process:
        print(describe_run(cfg, enh, acc, loader, step, total, run), flush=True)
