"""One trainer for every backbone, denoiser and stage, on Hugging Face accelerate.

``train`` reads as setup -> resume -> ``for step: train_step; log; maybe save``. How gradients are accumulated,
clipped and applied, and how the optimizer state is saved, is the backend's (``backends/``: plain / DDP, or
DeepSpeed ZeRO); the run folder and what it reports are ``runs.py``'s; checkpoints are ``checkpoint.py``'s.

Reproducibility is by construction: every random number of a step (noise, timesteps, masks, which local tokens
join, LoRA dropout) comes from generators seeded by (seed, step, micro-step), and the data order and crops from
(seed, epoch, sample index) (``seeding.py``). A checkpoint therefore only needs weights, optimizer, step and data
position to continue bit for bit, and a run with N processes sees the same global batches as one process.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, init_empty_weights
from accelerate.utils import gather_object

from . import checkpoint as ckpt_io
from .backends import Backend, build_backend, make_accelerator
from .cache import fingerprint
from .config import RunConfig, from_dict, to_dict
from .data import build_loader, open_files
from .enhancer import Enhancer, apply_stage, build_enhancer, init_device
from .errors import ConfigError, TrainingError
from .runs import RunFolder, RunLog, StopFlag, flat, open_run_dir, write_data_report
from .seeding import derive_seed, generator
from .summary import print_summary

NO_IMAGE = "no readable image"
# settings a resume may change without changing what the run computes
BOOKKEEPING = {"train.max_steps", "train.epochs", "train.resume", "train.output_dir", "train.log_every",
               "train.save_every", "train.keep_last", "train.trackers", "train.max_consecutive_nonfinite",
               "data.num_workers", "data.prefetch_factor", "data.max_skip_fraction"}


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator of micro-step ``micro`` of optimizer step ``step``: identical on every process."""
    return generator("draws", seed, step, micro)


def lr_at(step: int, base_lr: float, warmup: int) -> float:
    """Constant learning rate after a linear warm-up over ``warmup`` steps (step counts from 0)."""
    return base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr


@dataclass
class Progress:
    """What a checkpoint restores besides the weights: step, data position, counters, the optimizer state."""

    step: int = 0
    position: dict = field(default_factory=lambda: {"epoch": 0, "batch": 0})
    counters: dict = field(default_factory=lambda: {"nonfinite": 0, "skipped_steps": 0})  # + "empty_steps" once any
    data_stats: dict | None = None
    optimizer: dict | None = None
    checkpoint: Path | None = None


def train(cfg: RunConfig, resume: bool | None = None, accelerator: Accelerator | None = None) -> Path:
    """Run one stage as ``cfg`` says; returns the run folder (config.yaml, metrics.jsonl, checkpoints/)."""
    resume = cfg.train.resume if resume is None else resume
    files = open_files(cfg.data)  # a wrong data.path fails now, not after minutes of model loading
    _check_shapes(cfg)
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():  # accelerate would quietly run fp32
        raise ConfigError("train.precision=fp16 needs a GPU (the CPU has no fp16 loss scaling): use "
                          "train.precision=fp32 or bf16")
    acc = accelerator or make_accelerator(cfg)
    backend = build_backend(acc, cfg)
    with RunFolder(cfg, resume, acc.is_main_process, anyone=lambda flag: _anyone(acc, flag)) as folder:
        _run(cfg, folder.path, resume, acc, backend, files)
    return folder.path


def _run(cfg: RunConfig, run: Path, resume: bool, acc: Accelerator, backend: Backend, files) -> None:
    """Setup -> resume -> ``for step: train_step; log; maybe save`` in the locked run folder."""
    t = cfg.train
    enh, opt = _build(cfg, acc)
    # stage 2 checks that its backbone is this one (only the main process writes checkpoints)
    backbone_id = fingerprint(enh.backbone.vision) if cfg.stage.stage == "stage1" and acc.is_main_process else None
    progress = _resume(run, enh, acc, cfg) if resume else Progress()
    loader = _loader(cfg, enh, acc, progress, files)
    step, total = progress.step, _total_steps(cfg, loader)
    open_run_dir(acc, run, cfg, step)
    print_summary(cfg, enh, acc, loader, step, total, run)
    model = backend.prepare(enh, opt)
    if progress.optimizer is not None:
        try:
            backend.load_optimizer_state(progress.optimizer)
        except (RuntimeError, ValueError, KeyError) as e:
            raise _misfit(progress.checkpoint, e) from None
    log = RunLog(acc, run, cfg, step, total)
    batches = iter(loader)
    last_ckpt = ckpt_io.latest_checkpoint(run, quiet=True)
    try:
        with StopFlag() as stop:
            while step < total:
                record = train_step(step, model, backend, enh, batches, cfg)
                step += 1
                for name, reason in loader.take_skipped():
                    log.say(f"step {step}: skipped {name} ({reason})", everywhere=True)
                _count_skipped(record, progress.counters, log, t.max_consecutive_nonfinite, last_ckpt)
                loader.stats.check(cfg.data.max_skip_fraction)
                log.log(record)
                stopping = _anyone(acc, stop.signal is not None)  # all must agree, or the save's collectives hang
                if step % t.save_every == 0 or step == total or stopping:
                    last_ckpt = _save(backend, run, step, enh, loader, progress.counters, cfg, last_ckpt,
                                      backbone_id)
                if stopping:
                    by = f"signal {stop.signal}" if stop.signal is not None else "a signal to another process"
                    log.say(f"stopped by {by} after step {step}; checkpoint: {last_ckpt}; continue with --resume")
                    break
    finally:  # running out of memory propagates: the CLI names the fix (cli/__init__.py)
        log.close()
        del model  # the wrapped module goes before the process group (Backend.release)
        backend.release()
        acc.end_training()
    write_data_report(acc, run, loader.stats, progress.counters)


def train_step(step: int, model: torch.nn.Module, backend: Backend, enh: Enhancer, batches, cfg: RunConfig) -> dict:
    """One optimizer step (0-based ``step``) over ``train.grad_accum`` micro-batches; returns its metrics record,
    with ``skipped`` set to why the update was not applied ("loss", "gradient", "update", or NO_IMAGE)."""
    t, acc = cfg.train, backend.acc
    world, rank, device = acc.num_processes, acc.process_index, acc.device
    t0 = time.perf_counter()
    lr = lr_at(step, cfg.lr, cfg.optim.warmup_steps)
    backend.set_lr(lr)
    micro_batches = [next(batches) for _ in range(t.grad_accum)]
    n_images = sum(len(b["index"]) for b in micro_batches)
    everyone = n_images if world == 1 else int(acc.reduce(torch.tensor(n_images, device=device), "sum").item())
    if everyone == 0:  # nothing to learn from on any process (and so no gradient all-reduce to join)
        return {"step": step + 1, "loss": math.nan, "lr": lr, "grad_norm": math.nan, "images_per_s": 0.0,
                "s_per_step": time.perf_counter() - t0, "skipped": NO_IMAGE}
    loss_sum = torch.zeros((), device=device)
    for micro, batch in enumerate(micro_batches):
        draws = enh.draw(t.batch_size * world, step_generator(t.seed, step, micro))
        torch.manual_seed(derive_seed("dropout", t.seed, step, micro, rank))
        b = len(batch["index"])
        if b == 0:  # others have images: join their all-reduce with a stand-in whose loss weighs nothing
            batch = {"pixels": torch.full((1, 3, enh.image_size, enh.image_size), 0.5),
                     "slot": torch.zeros(1, dtype=torch.long)}
        # each kept sample takes the draws of its slot in the global micro-batch
        mine = {k: v[rank * t.batch_size + batch["slot"]].to(device) for k, v in draws.items()}
        data = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        with backend.accumulate(last=micro == t.grad_accum - 1):
            loss = model(data, mine).sum() / max(b, 1)
            backend.backward(loss if b else loss * 0)
        if b:
            loss_sum += loss.detach() * b
    loss_value = (acc.reduce(loss_sum, "sum") / everyone).item()
    grad_norm, skipped = backend.step(loss_finite=math.isfinite(loss_value))
    dt = time.perf_counter() - t0
    record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
              "images_per_s": everyone / dt, "s_per_step": dt}
    return {**record, "skipped": skipped} if skipped else record


def _count_skipped(record: dict, counters: dict, log: RunLog, max_in_a_row: int, last_ckpt: Path | None) -> None:
    """Count a step whose update was not applied; too many non-finite ones in a row stop the run."""
    reason, step = record.get("skipped"), record["step"]
    if reason is None:
        counters["nonfinite"] = 0
        return
    if reason == NO_IMAGE:  # the data, not the numerics: data.max_skip_fraction decides
        counters["empty_steps"] = counters.get("empty_steps", 0) + 1
        log.say(f"step {step}: {NO_IMAGE} in its batch, update skipped")
        return
    counters["nonfinite"] += 1
    counters["skipped_steps"] += 1
    log.say(f"step {step}: non-finite {reason}, update skipped")
    if counters["nonfinite"] > max_in_a_row:
        fix = "Raise optim.eps or lower optim.lr" if reason == "update" else \
            "Lower optim.lr or use train.precision=fp32"
        raise TrainingError(f"{counters['nonfinite']} non-finite steps in a row up to step {step}: the run diverged; "
                            f"last good checkpoint: {last_ckpt or 'none'}. {fix}")


def _anyone(acc: Accelerator, flag: bool) -> bool:
    """Whether ``flag`` is set on any process."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), "sum").item())


def _check_shapes(cfg: RunConfig) -> None:
    """Build the model from its configs alone, on the meta device, so that a denoiser that cannot take this
    backbone or latent space (``model.denoiser_arch``) fails in a second rather than after minutes of loading."""
    if cfg.model.latent not in ("pixel", "flux-vae"):  # the other latent spaces need their weights for their shapes
        return
    probe = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, random_init=True))
    with init_empty_weights():  # diffusers' autoencoder cannot be built under torch.device("meta") itself
        build_enhancer(probe, device="meta")


def _build(cfg: RunConfig, acc: Accelerator) -> tuple[Enhancer, torch.optim.Optimizer]:
    """The run's model, as the stage wants it, and AdamW over its trainable parameters."""
    torch.manual_seed(cfg.train.seed)  # the head's initialisation: identical on every process and every rerun
    enh = build_enhancer(cfg, device=init_device(cfg, acc.device))
    _load_init(enh, cfg)
    apply_stage(enh, cfg.stage, cfg.train.grad_checkpointing)
    if cfg.train.compile:  # in place, so that checkpoints keep the uncompiled parameter names
        enh.head.denoiser.compile()
    trainable = [p for p in enh.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("nothing to train: stage 2 with a frozen head needs the encoder tuned (stage.finetune)")
    o = cfg.optim
    fused = o.fused if o.fused is not None else acc.device.type == "cuda"
    return enh, torch.optim.AdamW(trainable, lr=cfg.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps,
                                  fused=fused or None)


def _load_init(enh: Enhancer, cfg: RunConfig) -> None:
    """Stage 2 starts from stage 1's projector and denoiser, trained on this very backbone."""
    if cfg.stage.stage != "stage2":
        return
    if not cfg.stage.init_from:
        raise ConfigError("stage 2 needs the stage-1 run: set stage.init_from=RUN_DIR (a `genhancer train` "
                          "stage-1 output folder)")
    src = Path(cfg.stage.init_from)
    if not src.exists():
        raise ConfigError(f"stage.init_from '{src}' does not exist: point it at a stage-1 run folder")
    # an older head than the newest would silently train stage 2 from less of stage 1: refuse instead
    weights, _, state = ckpt_io.load_checkpoint(ckpt_io.resolve_checkpoint(src, fallback=False))
    prev = state.get("config", {}).get("model", {})
    for key in ("denoiser", "latent", "condition"):
        if key in prev and prev[key] != getattr(cfg.model, key):
            raise ConfigError(f"stage.init_from was trained with model.{key}={prev[key]} but this run has "
                              f"{getattr(cfg.model, key)}: use the same model settings in both stages")
    if state.get("backbone") not in (None, fingerprint(enh.backbone.vision)):
        raise ConfigError(f"stage.init_from was trained on another backbone (model.backbone={prev.get('backbone')}, "
                          f"model.weights={prev.get('weights')}): use the stage-1 run's backbone and weights")
    enh.load_saved_weights(weights, head_only=True)


def _loader(cfg: RunConfig, enh: Enhancer, acc: Accelerator, progress: Progress, files):
    """This process's batches from the data position on, with the skip counts so far (``files``: the listed
    folder or shards, or None)."""
    t, stats = cfg.train, progress.data_stats
    source = files if files is not None else _cache_source(cfg, enh)
    loader = build_loader(cfg.data, enh.image_size, seed=t.seed, rank=acc.process_index, world=acc.num_processes,
                          batch_size=t.batch_size, epoch=progress.position["epoch"],
                          start_batch=progress.position["batch"], source=source)
    if stats and acc.num_processes == 1:  # per-rank counts: only a single process can take them over exactly
        loader.stats.seen, loader.stats.skipped = stats["seen"], stats["skipped"]
        loader.stats.by_reason = dict(stats["by_reason"])
    return loader


def _resume(run: Path, enh: Enhancer, acc: Accelerator, cfg: RunConfig) -> Progress:
    """Weights, RNG states and progress of the run's newest good checkpoint (its optimizer state is loaded once
    the backend is prepared: ZeRO's partitions exist only then)."""
    last = ckpt_io.latest_checkpoint(run)
    if last is None:
        why = "(see the warnings above)" if ckpt_io.list_checkpoints(run) else "yet"
        acc.print(f"no usable checkpoint under {run / 'checkpoints'} {why}: starting from step 0")
        return Progress()
    weights, opt_state, state = ckpt_io.load_checkpoint(last)
    try:
        enh.load_saved_weights(weights)
    except (ConfigError, RuntimeError, ValueError, KeyError) as e:  # other shapes / trainable parameters
        raise _misfit(last, e) from None
    per_process = state.get("rng_per_process") or []
    world = acc.num_processes
    ckpt_io.set_rng_state(per_process[acc.process_index] if len(per_process) == world else state["rng"])
    _warn_if_not_exact(last, state, cfg, world, acc.device.type == "cpu")
    acc.print(f"resumed from {last} at step {state['step']}")
    return Progress(state["step"], state["data_position"], state["counters"], state.get("data_stats"), opt_state, last)


def _misfit(ckpt: Path, error: Exception) -> ConfigError:
    reason = str(error).strip().splitlines()[0][:200]
    return ConfigError(f"checkpoint {ckpt} does not fit this run ({reason}): resume with the same model "
                       "and stage settings as the run that wrote it")


def _warn_if_not_exact(ckpt: Path, state: dict, cfg: RunConfig, world: int, cpu: bool) -> None:
    """Any setting that decides what a step computes, the process count and (on the CPU) the thread count may
    change on resume (e.g. another node count, a lower lr), but the run then no longer continues as the
    uninterrupted one would: say so, naming each change."""
    was, now = _settings(state.get("config", {})), _settings(to_dict(cfg))
    changed = [f"{k} {was.get(k)} -> {now.get(k)}" for k in sorted(was.keys() & now.keys())
               if k not in BOOKKEEPING and was[k] != now[k]]
    if state.get("world_size", world) != world:
        changed.append(f"processes {state['world_size']} -> {world}")
    if cpu and state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
        changed.append(f"CPU threads {state['threads']} -> {torch.get_num_threads()} (float sums in another order)")
    if changed:
        warnings.warn(f"resuming {ckpt} with {', '.join(changed)}: the run continues, but it no longer matches an "
                      "uninterrupted run (data order, random draws or numerics differ)", stacklevel=4)


def _settings(config: dict) -> dict:
    """A run's settings as flat ``section.key`` pairs, with the learning rate the run really uses."""
    out = flat(config)
    try:
        out["optim.lr"] = from_dict(config).lr  # None means the stage's default
    except ConfigError:  # written by another version: compare as written
        pass
    return out


def _save(backend: Backend, run: Path, step: int, enh: Enhancer, loader, counters: dict, cfg: RunConfig,
          last_ckpt: Path | None, backbone_id: str | None) -> Path | None:
    """Every process joins (the optimizer state and RNG states are gathered); the main process writes. Only
    finite weights are saved: a checkpoint is where a diverged run goes back to."""
    acc = backend.acc
    acc.wait_for_everyone()
    path = None
    weights = enh.weights_to_save()
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(f"the weights after step {step} are not finite ({len(bad)} tensors, e.g. {bad[0]}): no "
                            f"checkpoint written; last good checkpoint: {last_ckpt or 'none'}. Lower optim.lr or "
                            "raise optim.eps")
    opt_state = backend.optimizer_state()
    rngs = gather_object([ckpt_io.rng_state()]) if acc.num_processes > 1 else [ckpt_io.rng_state()]
    if acc.is_main_process:
        stats = loader.stats
        state = {"data_position": loader.position, "counters": counters, "rng": rngs[0], "rng_per_process": rngs,
                 "data_stats": {"seen": stats.seen, "skipped": stats.skipped, "by_reason": stats.by_reason},
                 "config": to_dict(cfg), "world_size": acc.num_processes, "threads": torch.get_num_threads()}
        if backbone_id:
            state["backbone"] = backbone_id
        path = ckpt_io.save_checkpoint(run, step, weights, opt_state, state, cfg.train.keep_last)
    acc.wait_for_everyone()
    return path


def _total_steps(cfg: RunConfig, loader) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    if loader.epoch_size is None:
        raise ConfigError("the data source's size is unknown (shards): set train.max_steps "
                          "(one CC3M epoch at global batch 256 is about 11500 steps)")
    steps = cfg.train.epochs * loader.epoch_size // cfg.train.grad_accum
    if steps < 1:
        raise ConfigError(f"the dataset gives fewer than one step ({loader.epoch_size} micro-batches of "
                          f"{cfg.train.batch_size} per process): lower train.batch_size or add images")
    return steps


def _cache_source(cfg: RunConfig, enh: Enhancer):
    if cfg.data.source != "cache":
        return None
    from .cache import open_cache

    return open_cache(cfg, enh)
