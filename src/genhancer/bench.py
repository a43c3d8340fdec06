"""``genhancer bench``: time the real training step of a configuration.

The benchmark runs :func:`genhancer.trainer.train` itself (so every fast-path switch of the config is what gets
measured) on images generated in memory (no disk, no decoding), or on a cache of them built first. A tracker
plugged into the run's Accelerator reads each step's time; the run is stopped after its last timed step, before
the final checkpoint, which would only cost disk time. Reported: seconds per step (median of the timed steps),
images per second, peak memory (GPU allocator peak, or the process's peak resident set on CPU), parameter counts,
and the model FLOPs per image, counted once on the meta device (no compute), with the MFU against the GPU's dense
bf16 peak.

A batch that does not fit is answered with the largest one that does, found by halving and bisection.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import statistics
import tempfile
from contextlib import nullcontext
from importlib import resources
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from . import hostmem
from .config import RunConfig, to_dict
from .errors import ConfigError
from .quiet import out_of_memory
from .threads import cpu_bf16

# Dense bf16 tensor-core peaks (FLOP/s) by device name; the first matching key wins.
GPU_BF16_PEAK = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                 ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12)]

PRESETS = {
    # The paper's setting (Table 7): OpenAI CLIP ViT-L/14 @224, FLUX VAE, FLUX-like n=2 (hidden 3072), bf16.
    # Random weights: the step costs the same, and no download is needed. Drawn on the device: on a CPU, whose
    # generator is serial, the 1.3 B head alone takes 35-40 s.
    "paper": {"model.backbone": "openai-clip-vit-l-14-224", "model.random_init": True, "model.latent": "flux-vae",
              "model.denoiser": "flux-paper", "model.init_on_device": True, "train.precision": "bf16",
              "train.grad_accum": 1},
    # The same structure in miniature, for CPUs: the shipped 64px miniworld CLIP (width 96, 480,385 parameters),
    # a 3-level AutoencoderKL (32/64/64 channels, 4 latent channels, /4; random weights) and flux-tiny; images are
    # made in the main process (workers are a switch to measure, and compete with the step for a small CPU's cores).
    "tiny": {"model.backbone": "<miniworld-clip>", "model.latent": "autoencoder", "model.latent_path": "<tiny-vae>",
             "model.denoiser": "flux-tiny", "train.precision": "fp32", "train.grad_accum": 1,
             "data.num_workers": 0},
}


def preset_base(name: str, work: Path) -> dict:
    """A bench preset as a nested config dict (``load_config(base=...)``); the tiny autoencoder is written under
    ``work``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown bench preset '{name}': choose one of {', '.join(PRESETS)}")
    base: dict = {}
    for key, value in PRESETS[name].items():
        if value == "<miniworld-clip>":
            value = str(resources.files("genhancer").joinpath("assets", "miniworld-clip"))
        elif value == "<tiny-vae>":
            value = str(tiny_autoencoder(work / "tiny-vae"))
        section, field = key.split(".")
        base.setdefault(section, {})[field] = value
    return base


def tiny_autoencoder(path: Path) -> Path:
    """A small random diffusers AutoencoderKL (seeded, so every call writes the same weights)."""
    from diffusers import AutoencoderKL

    if not (path / "config.json").is_file():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                                block_out_channels=(32, 64, 64), latent_channels=4, layers_per_block=1)
        vae.save_pretrained(path)
    return path


def at_resolution(cfg: RunConfig, size: int, work: Path) -> RunConfig:
    """``cfg`` with its backbone's architecture at input side ``size`` (random weights: a benchmark of cost)."""
    from .backbones import BACKBONES

    m = cfg.model
    if size < 1:
        raise ConfigError(f"--resolution must be >= 1, got {size}")
    if m.backbone in BACKBONES:
        config = copy.deepcopy(BACKBONES[m.backbone].config)
    elif (Path(m.backbone) / "config.json").is_file():
        config = json.loads((Path(m.backbone) / "config.json").read_text())
    else:
        raise ConfigError(f"--resolution needs a registered backbone or a local folder, not '{m.backbone}'")
    config["vision_config"]["image_size"] = size
    folder = work / f"backbone-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone, cfg.model.random_init, cfg.model.weights = str(folder), True, None
    return cfg


class _Finished(Exception):
    """Raised by the step clock after the last timed step: ends the run before its final checkpoint."""


class _StepClock(GeneralTracker):
    """An accelerate tracker that keeps each step's ``s_per_step`` (the trainer logs every step in a bench)."""

    name, requires_logging_directory = "genhancer-bench", False

    def __init__(self, total: int):
        super().__init__()
        self.total, self.times = total, []

    @property
    def tracker(self):
        return self

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.times.append(values["s_per_step"])
        if step == self.total:
            raise _Finished


def bench(cfg: RunConfig, *, warmup: int = 3, steps: int = 10, cache: bool = False, views: int = 1,
          cpu: bool = False, attention: str = "auto", peak_tflops: float | None = None,
          real_data: bool = False) -> dict:
    """Time ``steps`` training steps of ``cfg`` after ``warmup`` ones; returns the result record.

    ``real_data``: read ``cfg.data`` (disk, decoding) instead of images generated in memory. ``cache``: build a
    cache of ``views`` crops per image first and train from it. ``attention="math"``: force the unfused SDPA kernel.
    """
    if warmup < 0 or steps < 1:
        raise ConfigError("--warmup must be >= 0 and --steps >= 1")
    if attention not in ("auto", "math"):
        raise ConfigError(f"--attention must be 'auto' or 'math', got '{attention}'")
    with tempfile.TemporaryDirectory(prefix="genhancer-bench-") as tmp:
        tmp = Path(tmp)
        cfg = _bench_config(cfg, tmp, warmup + steps, real_data)
        cuda = torch.cuda.is_available() and not cpu
        if cfg.stage.stage == "stage2" and not cfg.stage.init_from:
            cfg.stage.init_from = str(_fresh_stage1(cfg, tmp / "stage1", "cuda" if cuda else "cpu"))
        if cache:
            from .cache import build_cache

            torch.manual_seed(cfg.train.seed)  # the trainer's random-init encoders must equal the cache's
            build_cache(cfg, tmp / "cache", views=views, batch_size=max(cfg.train.batch_size, 16),
                        device="cuda" if cuda else "cpu", log=lambda *_: None)
            cfg.data.source, cfg.data.path = "cache", str(tmp / "cache")
        clock = _StepClock(warmup + steps)
        gc.collect()
        _reset_peak_memory(cuda)
        if not _fits(cfg, cpu, attention, clock):
            # Searched outside the handler: a live exception keeps the failed step's tensors alive.
            failed = cfg.train.batch_size
            raise ConfigError(_oom_message(failed, _largest_batch(cfg, failed, cpu, attention, tmp), cuda))
        memory = _peak_memory(cuda)
    timed = clock.times[warmup:]
    s = statistics.median(timed)
    images = cfg.train.batch_size * cfg.train.grad_accum
    counts = model_counts(cfg)
    record = {
        "config": {"backbone": cfg.model.backbone, "latent": cfg.model.latent, "denoiser": cfg.model.denoiser,
                   "stage": cfg.stage.stage, "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
                   "precision": cfg.train.precision, "compile": cfg.train.compile,
                   "grad_checkpointing": cfg.train.grad_checkpointing,
                   "fused_adamw": cuda if cfg.optim.fused is None else cfg.optim.fused,
                   "num_workers": cfg.data.num_workers, "attention": attention, "cache": cache, "views": views,
                   "init_on_device": cfg.model.init_on_device},
        "warmup": warmup, "steps": steps, "s_per_it": s, "s_per_it_mean": statistics.fmean(timed),
        "s_per_it_min": min(timed), "s_per_100_it": 100 * s, "images_per_s": images / s, **memory,
        **counts, "machine": machine(cuda),
    }
    peak = peak_tflops * 1e12 if peak_tflops else gpu_bf16_peak() if cuda else None
    record["mfu"] = counts["flops_per_image"] * record["images_per_s"] / peak if peak else None
    return record


def bench_recipe(recipe: str | None, overrides: list[str] = (), *, preset: str = "tiny", stage: str | None = None,
                 batch_size: int | None = None, resolution: int | None = None, real_data: bool = False,
                 **options) -> dict:
    """:func:`bench` of a recipe (a path or shipped name; None: the preset alone) over ``preset``'s base, with the
    command's switches; ``options`` go to :func:`bench`. The record names the preset and architecture."""
    from .recipes import load_recipe

    with tempfile.TemporaryDirectory(prefix="genhancer-bench-") as work:
        # in-memory images unless asked: set before validation, which would otherwise want the recipe's data.path
        flags = ["data.source=synthetic"] * (not real_data) + [f"stage.stage={stage}"] * bool(stage)
        flags += [f"train.batch_size={batch_size}"] * bool(batch_size)
        cfg = load_recipe(recipe, flags + list(overrides), preset_base(preset, Path(work)))
        backbone = cfg.model.backbone
        if resolution:
            cfg = at_resolution(cfg, resolution, Path(work))
        record = bench(cfg, real_data=real_data, **options)
    record["preset"] = preset
    if resolution:  # name the architecture, not the temporary folder that held its config
        record["config"]["backbone"] = f"{backbone} at {resolution}px (random weights)"
    return record


def _bench_config(cfg: RunConfig, tmp: Path, total: int, real_data: bool) -> RunConfig:
    """The run as benchmarked: synthetic in-memory images, exactly one epoch of them, every step logged."""
    cfg = copy.deepcopy(cfg)
    t = cfg.train
    if cfg.data.source == "cache":
        raise ConfigError("bench builds its own cache (--cache): give the images' data.source, not a cache")
    if not real_data:
        cfg.data.source, cfg.data.path = "synthetic", None
    cfg.data.synthetic_size = t.batch_size * t.grad_accum * total  # no epoch boundary inside the timed steps
    t.max_steps, t.log_every, t.save_every, t.resume = total, 1, total + 1, False
    t.output_dir, t.trackers = str(tmp / "run"), []
    return cfg


def _run(cfg: RunConfig, cpu: bool, attention: str, clock: GeneralTracker | None = None) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .trainer import train

    acc = Accelerator(cpu=cpu, mixed_precision="no" if cfg.train.precision == "fp32" else cfg.train.precision,
                      log_with=[clock] if clock else None)
    # "math": the unfused reference attention, to measure what the fused SDPA kernels buy.
    kernels = sdpa_kernel([SDPBackend.MATH]) if attention == "math" else nullcontext()
    torch.manual_seed(cfg.train.seed)
    with kernels:
        try:
            train(cfg, accelerator=acc)
        except _Finished:
            pass


def _fresh_stage1(cfg: RunConfig, run: Path, device: str) -> Path:
    """A stage-1 checkpoint with a freshly initialised head, for benchmarking stage 2 without a stage-1 run."""
    from . import checkpoint as ckpt_io
    from .enhancer import build_enhancer, init_device

    head = build_enhancer(cfg, device=init_device(cfg, device)).head
    weights = {f"head.{k}": v.cpu() for k, v in head.state_dict().items()}
    return ckpt_io.save_checkpoint(run, 0, weights, {"state": {}, "param_groups": []}, {"config": to_dict(cfg)}, 1)


def _fits(cfg: RunConfig, cpu: bool, attention: str, clock: GeneralTracker | None = None) -> bool:
    """Run ``cfg``; False when it ran out of memory (other errors propagate)."""
    try:
        _run(cfg, cpu, attention, clock)
        return True
    except BaseException as e:  # noqa: BLE001 - an OOM may come wrapped in another error
        if not out_of_memory(e):
            raise
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return False


def _largest_batch(cfg: RunConfig, failed: int, cpu: bool, attention: str, tmp: Path) -> int:
    """The largest per-device batch below ``failed`` whose two training steps fit (0: none)."""
    def fits(b: int) -> bool:
        trial = copy.deepcopy(cfg)
        trial.train.batch_size, trial.train.max_steps = b, 2
        trial.train.output_dir = str(tmp / f"trial-{b}")
        return _fits(trial, cpu, attention)

    hi, b = failed, failed // 2
    while b >= 1 and not fits(b):
        hi, b = b, b // 2
    if b == 0:
        return 0
    lo = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _oom_message(failed: int, largest: int, cuda: bool) -> str:
    where = "GPU memory" if cuda else "memory"
    if largest == 0:
        return (f"train.batch_size={failed} does not fit in {where}, and neither does batch 1: enable "
                "train.grad_checkpointing=true, train.precision=bf16, or use a smaller model")
    return (f"train.batch_size={failed} does not fit in {where}; the largest batch that fits is {largest} "
            f"(found by the bench): set train.batch_size={largest} and raise train.grad_accum to keep the global batch")


def _reset_peak_memory(cuda: bool) -> None:
    if cuda:
        torch.cuda.empty_cache()  # what the cache build or a failed trial left reserved is not this run's
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: "5" resets the process's peak resident set (VmHWM) to its current size
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_memory(cuda: bool) -> dict:
    if cuda:
        return {"peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30, "memory_kind": "cuda allocated"}
    import resource

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak_kb = int(line.split()[1])
    return {"peak_memory_gb": peak_kb / 2**20, "memory_kind": "process peak RSS"}


def _meta_enhancer(cfg: RunConfig):
    """The run's model with no storage (meta device): for counting parameters and FLOPs at any size."""
    from .enhancer import apply_stage, build_enhancer

    c = copy.deepcopy(cfg)
    c.model.random_init = True
    c.train.grad_checkpointing = False  # model FLOPs: recomputation is not counted
    enh = build_enhancer(c, device="meta")
    apply_stage(enh, c.stage)
    return enh


def model_counts(cfg: RunConfig) -> dict:
    """Parameter counts, and the FLOPs of one training step's forward + backward per image (as run: a cached
    stage 1 skips the encoders)."""
    from torch.utils.flop_counter import FlopCounterMode

    enh = _meta_enhancer(cfg)
    n = lambda mod, trainable=False: sum(p.numel() for p in mod.parameters() if p.requires_grad or not trainable)
    b = cfg.train.batch_size
    draws = {k: v.to("meta") for k, v in enh.draw(b, torch.Generator().manual_seed(0)).items()}
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    pixels = meta(b, 3, enh.image_size, enh.image_size)
    if cfg.data.source != "cache":
        batch = {"pixels": pixels}
    elif cfg.stage.stage == "stage1":
        tokens = 1 + (enh.backbone.num_patches if cfg.model.condition == "cls+local" else 0)
        batch = {"target": meta(b, *enh.target_shape), "cond": meta(b, tokens, enh.backbone.cond_dim)}
    else:
        batch = {"target": meta(b, *enh.target_shape), "pixels": pixels}
    with FlopCounterMode(display=False) as counter:
        enh(batch, draws).sum().backward()
    return {"params_backbone": n(enh.backbone), "params_latent": n(enh.latent), "params_head": n(enh.head),
            "params_denoiser": n(enh.head.denoiser), "params_trainable": n(enh, True),
            "flops_per_image": counter.get_total_flops() / b, "image_size": enh.image_size}


def gpu_bf16_peak() -> float | None:
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in GPU_BF16_PEAK if key in name), None)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(cuda: bool = False) -> str:
    """What a measurement ran on: the GPU, the CPU and its load, torch's threads and version (every bench prints it)."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    kernels = f"{torch.backends.cpu.get_cpu_capability()} kernels{'' if cpu_bf16() else ', bf16 emulated'}"
    cpu = (f"CPU: {cpu_name()} ({kernels}), {os.cpu_count()} logical cores, load average {load} (1/5/15 min); "
           f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); host memory: "
           f"{'freed memory kept' if hostmem.kept else 'malloc defaults'}")
    if cuda:
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        return f"{torch.cuda.get_device_name()} ({memory:.0f} GiB); {cpu}"
    return cpu


def table(record: dict) -> str:
    """A two-column text table of a bench record."""
    c = record["config"]
    gb = lambda x: f"{x:.2f} GiB" if x is not None else "-"  # noqa: E731
    rows = [
        ("machine", record["machine"]),
        ("model", f"{c['backbone']} | {c['latent']} | {c['denoiser']} | {record['image_size']}px"),
        ("stage / batch", f"{c['stage']} / {c['batch_size']} x {c['grad_accum']} accum"),
        ("switches", f"precision={c['precision']} compile={c['compile']} grad_ckpt={c['grad_checkpointing']} "
                     f"fused={c['fused_adamw']} attention={c['attention']} workers={c['num_workers']}"),
        ("data", f"cache ({c['views']} view{'s' if c['views'] > 1 else ''})" if c["cache"] else "images (in memory)"),
        ("s / it (median)", f"{record['s_per_it']:.4f} (mean {record['s_per_it_mean']:.4f}, "
                            f"{record['steps']} timed after {record['warmup']} warm-up)"),
        ("s / 100 it", f"{record['s_per_100_it']:.2f}"),
        ("images / s", f"{record['images_per_s']:.1f}"),
        ("peak memory", f"{gb(record['peak_memory_gb'])} ({record['memory_kind']})"),
        ("params", f"backbone {record['params_backbone']:,}, latent {record['params_latent']:,}, "
                   f"head {record['params_head']:,} (denoiser {record['params_denoiser']:,}), "
                   f"trainable {record['params_trainable']:,}"),
        ("GFLOPs / image", f"{record['flops_per_image'] / 1e9:.2f} (fwd + bwd)"),
        ("MFU (bf16 peak)", f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "- (GPU only)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def append_json(record: dict, path: str | Path) -> None:
    """Append the record as one JSON line (a sweep appends one line per configuration)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
