"""One trainer for every backbone, denoiser and stage, on Hugging Face accelerate.

Reproducibility is by construction: every random number of a step (noise, timesteps, masks, which local tokens
join, LoRA dropout) comes from generators seeded by (seed, step, micro-step), and the data order and crops from
(seed, epoch, sample index). A checkpoint therefore only needs weights, optimizer, step and data position to
continue bit for bit, and a run with N processes sees the same global batches as one process.
"""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from . import checkpoint as ckpt_io
from . import zero
from .config import ConfigError, RunConfig, from_dict, to_dict
from .data import build_loader
from .enhancer import Enhancer, apply_stage, build_enhancer


class TrainingError(RuntimeError):
    """A run that had to stop (divergence, too many bad samples); the message names the step and the fix."""


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator of micro-step ``micro`` of optimizer step ``step``: identical on every process."""
    return torch.Generator().manual_seed(_seed(seed, step, micro))


def lr_at(step: int, base_lr: float, warmup: int) -> float:
    """Constant learning rate after a linear warm-up over ``warmup`` steps (step counts from 0)."""
    return base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr


class _StopFlag:
    """Turns SIGTERM / SIGINT into a request to checkpoint and exit after the current step."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_run_dir(cfg: RunConfig, resume: bool) -> Path:
    """The run folder; refuse to overwrite a run by accident (created later, once everything is checked)."""
    run = Path(cfg.train.output_dir)
    if run.exists() and not run.is_dir():
        raise ConfigError(f"train.output_dir '{run}' is a file: choose a folder")
    parent = next((p for p in run.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"train.output_dir '{run}' is inside '{parent}', which is a file: choose a folder")
    if ckpt_io.list_checkpoints(run) and not resume:
        raise ConfigError(f"'{run}' already holds checkpoints of a run: pass --resume to continue it, "
                          "or choose another train.output_dir")
    return run


def _load_init(enh: Enhancer, cfg: RunConfig) -> None:
    """Stage 2 starts from stage 1's projector and denoiser."""
    if cfg.stage.stage != "stage2":
        return
    if not cfg.stage.init_from:
        raise ConfigError("stage 2 needs the stage-1 run: set stage.init_from=RUN_DIR (a `genhancer train` "
                          "stage-1 output folder)")
    src = Path(cfg.stage.init_from)
    if not src.exists():
        raise ConfigError(f"stage.init_from '{src}' does not exist: point it at a stage-1 run folder")
    weights, _, state = ckpt_io.load_checkpoint(ckpt_io.resolve_checkpoint(src))
    prev = state.get("config", {}).get("model", {})
    for key in ("denoiser", "latent", "condition"):
        if key in prev and prev[key] != getattr(cfg.model, key):
            raise ConfigError(f"stage.init_from was trained with model.{key}={prev[key]} but this run has "
                              f"{getattr(cfg.model, key)}: use the same model settings in both stages")
    enh.load_saved_weights(weights, head_only=True)


def train(cfg: RunConfig, resume: bool | None = None, accelerator: Accelerator | None = None) -> Path:
    """Run one stage as ``cfg`` says; returns the run folder (config.yaml, metrics.jsonl, checkpoints/)."""
    resume = cfg.train.resume if resume is None else resume
    t = cfg.train
    acc = accelerator or _accelerator(cfg)
    if acc.distributed_type.name == "FSDP":
        raise ConfigError("accelerate's FSDP is not supported by the trainer: shard with DeepSpeed ZeRO-2 "
                          "(configs/accelerate/deepspeed-zero2-8gpu.yaml) or launch with DDP (ddp-8gpu.yaml)")
    sharded = acc.distributed_type.name == "DEEPSPEED"
    if sharded:
        acc.print(zero.configure(acc, cfg))
    world, rank = acc.num_processes, acc.process_index
    run = check_run_dir(cfg, resume)
    torch.manual_seed(t.seed)  # the head's initialisation: identical on every process and every rerun
    enh = build_enhancer(cfg)
    _load_init(enh, cfg)
    apply_stage(enh, cfg.stage, t.grad_checkpointing)
    if t.compile:  # in place, so that checkpoints keep the uncompiled parameter names
        enh.head.denoiser.compile()
    trainable = [p for p in enh.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("nothing to train: stage 2 with a frozen head needs the encoder tuned (stage.finetune)")
    fused = cfg.optim.fused if cfg.optim.fused is not None else acc.device.type == "cuda"
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay,
                            eps=cfg.optim.eps, fused=fused or None)

    step, position, counters = 0, {"epoch": 0, "batch": 0}, {"nonfinite": 0, "skipped_steps": 0}
    data_stats, opt_state = None, None
    if resume and run.is_dir():
        last = ckpt_io.latest_checkpoint(run)
        if last is not None:
            weights, opt_state, state = ckpt_io.load_checkpoint(last)
            try:
                enh.load_saved_weights(weights)
                if not sharded:  # ZeRO's partitions exist only after prepare
                    opt.load_state_dict(opt_state)
            except (ConfigError, RuntimeError, ValueError, KeyError) as e:  # other shapes / trainable parameters
                raise _misfit(last, e) from None
            per_process = state.get("rng_per_process") or []
            ckpt_io.set_rng_state(per_process[rank] if len(per_process) == world else state["rng"])
            step, position, counters = state["step"], state["data_position"], state["counters"]
            data_stats = state.get("data_stats")
            _warn_if_not_exact(last, state, t, world)
            acc.print(f"resumed from {last} at step {step}")
        elif ckpt_io.list_checkpoints(run):
            acc.print(f"no usable checkpoint under {run / 'checkpoints'} (see the warnings above): starting from step 0")
    loader = build_loader(cfg.data, enh.image_size, seed=t.seed, rank=rank, world=world,
                          batch_size=t.batch_size, epoch=position["epoch"], start_batch=position["batch"],
                          **_cache_source(cfg, enh))
    if data_stats and world == 1:  # per-rank counts: only a single process can take them over exactly
        loader.stats.seen, loader.stats.skipped = data_stats["seen"], data_stats["skipped"]
        loader.stats.by_reason = dict(data_stats["by_reason"])
    total = _total_steps(cfg, loader, world)
    if acc.is_main_process:  # everything is checked: only now does the run leave traces on disk
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        _truncate_metrics(run / "metrics.jsonl", step)
    acc.wait_for_everyone()

    enh.to(acc.device)
    with zero.scalars_as_vectors(enh) if sharded else nullcontext():
        model, opt = acc.prepare(enh, opt)
    if sharded and opt_state is not None:
        try:
            zero.load_optimizer_state(opt, trainable, opt_state)
        except (RuntimeError, ValueError, KeyError) as e:
            raise _misfit(last, e) from None
    if acc.log_with:
        acc.init_trackers("genhancer", config=_flat(to_dict(cfg)))

    metrics = open(run / "metrics.jsonl", "a") if acc.is_main_process else None
    bar = tqdm(total=total, initial=step, disable=not acc.is_main_process, desc=cfg.stage.stage, dynamic_ncols=True)
    batches = iter(loader)
    last_ckpt = ckpt_io.latest_checkpoint(run, quiet=True)
    global_micro = t.batch_size * world
    try:
        with _StopFlag() as stop:
            while step < total:
                t0 = time.perf_counter()
                lr = lr_at(step, cfg.lr, cfg.optim.warmup_steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                loss_sum, n_images = torch.zeros((), device=acc.device), 0
                for micro in range(t.grad_accum):
                    last_micro = micro == t.grad_accum - 1
                    batch = next(batches)
                    gen = step_generator(t.seed, step, micro)
                    draws = enh.draw(global_micro, gen)
                    torch.manual_seed(_seed(t.seed, step, micro, rank))  # dropout
                    b = len(batch["index"])
                    # each kept sample takes the draws of its slot in the global micro-batch
                    mine = {k: v[rank * t.batch_size + batch["slot"]].to(acc.device) for k, v in draws.items()}
                    data = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
                    # an empty micro-batch (every sample unreadable) still runs, so that all
                    # processes join the same gradient all-reduce
                    if sharded:  # the engine autocasts, divides by grad_accum and reduces into shards
                        loss = model(data, mine).sum() / max(b, 1)
                        model.set_gradient_accumulation_boundary(last_micro)
                        model.backward(loss)
                    else:
                        with nullcontext() if last_micro else acc.no_sync(model), acc.autocast():
                            loss = model(data, mine).sum() / max(b, 1)
                            acc.backward(loss / t.grad_accum)
                    loss_sum += loss.detach() * b
                    n_images += b
                loss_value = (acc.reduce(loss_sum, "sum") / max(1, acc.reduce(torch.tensor(n_images, device=acc.device), "sum"))).item()
                if sharded:  # clips, then steps, or skips a step whose gradient norm is not finite
                    model.step()
                    grad_norm = model.get_global_grad_norm()
                    grad_norm = math.inf if grad_norm is None or opt.step_was_skipped else float(grad_norm)
                else:  # max_norm=inf measures the norm without clipping (optim.grad_clip=0)
                    grad_norm = acc.clip_grad_norm_(trainable, cfg.optim.grad_clip or math.inf)
                if math.isfinite(loss_value) and math.isfinite(float(grad_norm)):
                    if not sharded:
                        opt.step()
                    counters["nonfinite"] = 0
                else:
                    counters["nonfinite"] += 1
                    counters["skipped_steps"] += 1
                    if acc.scaler is not None:  # fp16: lower the loss scale, re-arm unscale_ for the next step
                        acc.scaler.update()
                    if acc.is_main_process:  # tqdm.write: a line of its own, not glued to the progress bar
                        tqdm.write(f"step {step + 1}: non-finite "
                                   f"{'loss' if not math.isfinite(loss_value) else 'gradient'}, update skipped")
                    if counters["nonfinite"] > t.max_consecutive_nonfinite:
                        raise TrainingError(
                            f"{counters['nonfinite']} non-finite steps in a row up to step {step + 1}: the run diverged; "
                            f"last good checkpoint: {last_ckpt or 'none'}. Lower optim.lr or use train.precision=fp32")
                opt.zero_grad(set_to_none=True)
                step += 1
                loader.stats.check(cfg.data.max_skip_fraction)
                dt = time.perf_counter() - t0
                record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                          "images_per_s": n_images * world / dt, "s_per_step": dt}
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{record['images_per_s']:.1f}")
                if step % t.log_every == 0 or step == total:
                    if metrics:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                    acc.log({k: v for k, v in record.items() if k != "step"}, step=step)
                stopping = stop.signal is not None
                if world > 1:  # all processes must agree, or the checkpoint's collectives would hang
                    stopping = bool(acc.reduce(torch.tensor(float(stopping), device=acc.device), "sum").item())
                if step % t.save_every == 0 or step == total or stopping:
                    last_ckpt = _save(acc, run, step, enh, opt, trainable if sharded else None, loader, counters, cfg)
                if stopping:
                    if acc.is_main_process:
                        by = f"signal {stop.signal}" if stop.signal is not None else "a signal to another process"
                        tqdm.write(f"stopped by {by} after step {step}; checkpoint: {last_ckpt}; continue with --resume")
                    break
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(f"train.batch_size={t.batch_size} does not fit in device memory: lower it (with a "
                            "higher train.grad_accum), or find the largest that fits with `genhancer bench`") from None
    finally:
        bar.close()
        if metrics:
            metrics.close()
        acc.end_training()
    if acc.is_main_process:
        acc.print(f"{loader.stats.summary()}; non-finite steps skipped: {counters['skipped_steps']}")
        (run / "data_report.json").write_text(json.dumps(
            {"seen": loader.stats.seen, "skipped": loader.stats.skipped, "by_reason": loader.stats.by_reason,
             "nonfinite_steps": counters["skipped_steps"]}, indent=1))
    return run


def _accelerator(cfg: RunConfig) -> Accelerator:
    t = cfg.train
    kwargs = {"mixed_precision": "no" if t.precision == "fp32" else t.precision}
    if zero.requested():
        kwargs = zero.accelerator_kwargs(cfg)
    return Accelerator(log_with=[x for x in t.trackers if _tracker_available(x)] or None, project_dir=t.output_dir,
                       **kwargs)


def _misfit(ckpt: Path, error: Exception) -> ConfigError:
    reason = str(error).strip().splitlines()[0][:200]
    return ConfigError(f"checkpoint {ckpt} does not fit this run ({reason}): resume with the same model "
                       "and stage settings as the run that wrote it")


def _warn_if_not_exact(ckpt: Path, state: dict, t, world: int) -> None:
    """Seed, batch and process count decide the data position's meaning and every draw: changing them on resume
    is allowed (e.g. another node count), but the run no longer continues as the uninterrupted one would."""
    was = state.get("config", {}).get("train", {})
    changed = [f"train.{k} {was[k]} -> {getattr(t, k)}" for k in ("seed", "batch_size", "grad_accum")
               if k in was and was[k] != getattr(t, k)]
    if state.get("world_size", world) != world:
        changed.append(f"processes {state['world_size']} -> {world}")
    if changed:
        warnings.warn(f"resuming {ckpt} with {', '.join(changed)}: the run continues, but its data order and random "
                      "draws differ from those of an uninterrupted run", stacklevel=3)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a killed run logged after the checkpoint it resumes from (they are recomputed)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a line torn by the kill
            pass
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)


def _save(acc, run, step, enh, opt, sharded_params, loader, counters, cfg) -> Path | None:
    """Rank 0 writes the checkpoint; ``sharded_params``: the trainable parameters when ZeRO shards their state."""
    acc.wait_for_everyone()
    path = None
    if sharded_params:  # collective
        opt_state = zero.gather_optimizer_state(opt, sharded_params, keep=acc.is_main_process)
    else:
        opt_state = opt.state_dict() if acc.is_main_process else None
    rngs = gather_object([ckpt_io.rng_state()]) if acc.num_processes > 1 else [ckpt_io.rng_state()]
    if acc.is_main_process:
        stats = loader.stats
        state = {"data_position": loader.position, "counters": counters, "rng": rngs[0], "rng_per_process": rngs,
                 "data_stats": {"seen": stats.seen, "skipped": stats.skipped, "by_reason": stats.by_reason},
                 "config": to_dict(cfg), "world_size": acc.num_processes}
        path = ckpt_io.save_checkpoint(run, step, enh.weights_to_save(), opt_state, state, cfg.train.keep_last)
    acc.wait_for_everyone()
    return path


def _total_steps(cfg: RunConfig, loader, world: int) -> int:
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


def _cache_source(cfg: RunConfig, enh: Enhancer) -> dict:
    if cfg.data.source != "cache":
        return {}
    from .cache import open_cache

    return {"source": open_cache(cfg, enh)}


def _tracker_available(name: str) -> bool:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name, name)
    return importlib.util.find_spec(module) is not None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def load_run_config(path: str | Path) -> RunConfig:
    """The config a run or checkpoint folder was trained with."""
    p = Path(path)
    if (p / "state.json").is_file():
        return from_dict(json.loads((p / "state.json").read_text())["config"])
    if (p / "config.yaml").is_file():
        return from_dict(yaml.safe_load((p / "config.yaml").read_text()))
    raise ConfigError(f"'{p}' is not a run or checkpoint folder (no config.yaml / state.json)")
