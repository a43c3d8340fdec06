"""The README's main command: GenHancer end to end in the miniature world, offline, on 2 CPU cores.

Generates the world (training images and the held-out benchmarks), runs stage 1 and stage 2 of the real trainer
on the shipped tiny base CLIP (continuous denoiser in a 2x-downsampled pixel space: 64 tokens of 4x4x3 pixels),
exports the enhanced CLIP, evaluates base vs enhanced (MMVP-VLM by the standard evaluator, the large MMVP
version, text-free probes) and writes a report folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from genhancer.errors import ConfigError

LABELS = ("Original", "GenHancer")


@dataclass(frozen=True)
class Recipe:
    """Sizes and hyper-parameters of one demo run (every choice made on the val split: docs/miniworld.md)."""

    train_images: int = 2000
    large_parts: int = 7
    denoiser: str = "flux-mini"  # hidden 128: flux-tiny (64) could not draw the details (incentive table)
    latent_downsample: int = 2
    logit_normal_mean: float = 1.0  # timesteps towards noise, where the condition decides the loss
    logit_normal_scale: float = 0.1  # ... concentrated there (t near 0.73): val split, docs/miniworld.md
    stage1_steps: int = 1200  # from the encoder cache
    stage2_steps: int = 600
    batch_size: int = 16
    stage2_batch_size: int = 32
    stage1_lr: float = 1e-3
    stage2_lr: float = 5e-4
    stage2_train_head: bool = True  # the paper's "all" (Fig. 9): the head co-adapts with the encoder
    lora_r: int = 16  # the paper's
    probe_train: int = 2000
    probe_test: int = 1000
    probe_pairs: int = 200
    recon_steps: int = 20
    read_scenes: int = 256  # scenes of the incentive read-out (what the head reads through each encoder)


FULL = Recipe()
FAST = Recipe(train_images=32, large_parts=1, stage1_steps=2, stage2_steps=2, batch_size=8, stage2_batch_size=8,
              probe_train=90, probe_test=45, probe_pairs=8, recon_steps=2, read_scenes=8)


def run_config(recipe: Recipe, base: str, images: Path, out: Path, stage: str, init_from: Path | None = None,
               seed: int = 0, extra: tuple[str, ...] = ()):
    """The trainer's RunConfig of one stage in the miniature world (``images``: a folder, or a stage-1 cache)."""
    from genhancer.config import load_config

    stage1 = stage == "stage1"
    source = "cache" if (Path(images) / "manifest.json").is_file() else "folder"
    overrides = [
        f"model.backbone={base}", "model.latent=pixel", f"model.latent_downsample={recipe.latent_downsample}",
        f"model.denoiser={recipe.denoiser}", f"objective.logit_normal_mean={recipe.logit_normal_mean}",
        f"objective.logit_normal_scale={recipe.logit_normal_scale}",
        f"data.source={source}", f"data.path={images}", "data.num_workers=0", "data.crop_scale=[1.0, 1.0]",
        f"train.batch_size={recipe.batch_size if stage1 else recipe.stage2_batch_size}", "train.grad_accum=1",
        "train.precision=fp32", f"train.output_dir={out}", "train.trackers=[]", "train.log_every=1",
        f"train.seed={seed}", f"stage.stage={stage}", f"stage.lora_r={recipe.lora_r}",
        f"stage.lora_alpha={recipe.lora_r}", f"stage.train_head={recipe.stage2_train_head}",
        f"train.max_steps={recipe.stage1_steps if stage1 else recipe.stage2_steps}",
        f"optim.lr={recipe.stage1_lr if stage1 else recipe.stage2_lr}",
        f"train.save_every={max(recipe.stage1_steps, recipe.stage2_steps)}", "train.keep_last=1",
    ]
    if init_from is not None:
        overrides.append(f"stage.init_from={init_from}")
    return load_config(overrides=overrides + list(extra))


def recipe_table(recipe: Recipe) -> str:
    """The demo's settings as a Markdown table."""
    rows = [f"| `{k}` | {v} |" for k, v in asdict(recipe).items()]
    return "\n".join(["| setting | value |", "| --- | --- |", *rows])


def write_world(root: Path, recipe: Recipe, split: str = "held-out") -> dict[str, Path]:
    """Training images (train split) and the benchmarks under ``root``: the held-out ones, or with ``split="val"``
    the large one drawn from the val seeds instead (for design choices; as the val MMVP-large of docs/miniworld.md)."""
    from genhancer.miniworld.benchmark import write_benchmarks, write_large
    from genhancer.miniworld.scenes import SPLITS, render, scene_from_seed

    if split not in ("held-out", "val"):
        raise ConfigError(f"unknown split '{split}': choose 'held-out' (reported numbers) or 'val' (design choices)")
    images = root / "train"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(recipe.train_images):
        render(scene_from_seed(SPLITS["train"] + i)).save(images / f"{i:06d}.png")
    if split == "val":
        return {"train": images,
                "mmvp-large": write_large(root / "mmvp-large-val", recipe.large_parts, first_seed=SPLITS["val"])}
    return {"train": images, **write_benchmarks(root, recipe.large_parts)}


def loss_curves(runs: dict[str, Path], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    offset = 0
    for name, run in runs.items():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [offset + r["step"] for r in rows]
        ax.plot(steps, [r["loss"] for r in rows], label=name, alpha=0.8)
        offset = steps[-1] if steps else offset
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("denoising loss")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


# The attributes the base is blind to: near the bottom of its val-split MMVP (Orientation 6.7, Position 4.4,
# Text 11.1, Structure 53.3) with their information only weakly linearly present (probes 34-62%); the base sees
# the others (probes >= 88%). Chosen on the val split, before any GenHancer run; docs/miniworld.md.
BLIND = ("direction", "relation", "structure", "text")
COARSE = ("colour", "state", "view")


def summary(probes: dict, large: dict) -> dict[str, float]:
    """The headline numbers of base and enhanced: blind-attribute probe average, large MMVP average, coarse
    probe average, blind-pair average (each as ``{label: value}``)."""
    def mean(label, keys):
        return float(sum(probes[label]["linear"][k] for k in keys) / len(keys))

    return {"blind_probe": {lb: mean(lb, BLIND) for lb in LABELS},
            "mmvp_large": {lb: large[lb]["average"] for lb in LABELS},
            "coarse_probe": {lb: mean(lb, COARSE) for lb in LABELS},
            "blind_pairs": {lb: probes[lb]["blind_pairs"]["average"] for lb in LABELS}}


def summary_table(numbers: dict) -> str:
    names = {"blind_probe": f"linear probe, attributes the base is blind to ({', '.join(BLIND)})",
             "mmvp_large": "MMVP-VLM large, average", "coarse_probe": f"linear probe, coarse ({', '.join(COARSE)})",
             "blind_pairs": "blind pairs told apart, average"}
    lines = [f"| measure (%) | {LABELS[0]} | {LABELS[1]} | change |", "|---|---|---|---|"]
    for key, name in names.items():
        b, e = (numbers[key][lb] for lb in LABELS)
        lines.append(f"| {name} | {b:.1f} | {e:.1f} | {e - b:+.1f} |")
    return "\n".join(lines)


def probe_table(base: dict, enhanced: dict) -> str:
    lines = []
    for probe, title in (("linear", "linear probe accuracy (%)"), ("blind_pairs", "blind pairs told apart (%)")):
        keys = list(base[probe])
        lines += [f"| {title} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for label, result in zip(LABELS, (base, enhanced)):
            lines.append(f"| {label} | " + " | ".join(f"{result[probe][k]:.1f}" for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def shipped_incentive() -> str:
    """The incentive table of the demo's stage-1 recipe, as measured and shipped with the package."""
    from importlib import resources

    return (resources.files("genhancer") / "assets" / "miniworld-incentive.md").read_text().strip()


def reconstruction_figure(run: Path, images: torch.Tensor, path: Path, steps: int, grid: int | None = None
                          ) -> dict[str, float]:
    """Grid input | sample from the image's own condition | sample from another image's condition (of the first
    ``grid`` images; all by default); returns the mean squared error (in [0, 1] pixels, at the latent's resolution)
    of both samples against the input, over all images."""
    from genhancer.reconstruct import load_enhancer, reconstruct, save_grid

    enh = load_enhancer(run)
    own = reconstruct(enh, images, steps=steps)
    other = reconstruct(enh, images.roll(1, 0), steps=steps)
    ref = torch.nn.functional.interpolate(images, size=own.shape[-2:], mode="area")
    save_grid([images[:grid], own[:grid], other[:grid]], path)
    return {"own": float((own - ref).pow(2).mean()), "other": float((other - ref).pow(2).mean())}


def demo(out: str | Path = "miniworld-demo", fast: bool = False, seed: int = 0) -> Path:
    """Run the demo into ``out`` (which must not exist yet or be empty); returns the report folder."""
    from genhancer.cache import build_cache
    from genhancer.evaluation.report import mmvp_table, radar_chart
    from genhancer.export import export_model
    from genhancer.miniworld.base import shipped_base
    from genhancer.miniworld.benchmark import evaluate_mmvp
    from genhancer.miniworld.incentive import read_costs, table
    from genhancer.miniworld.probes import run_probes
    from genhancer.miniworld.scenes import SPLITS, render_many, scene_from_seed
    from genhancer.trainer import train

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty: give a new folder for the demo's report")
    recipe = FAST if fast else FULL
    start = time.time()
    base = str(shipped_base())
    print(f"[1/7] generating the world into {out / 'world'} ({torch.get_num_threads()} torch thread(s))", flush=True)
    world = write_world(out / "world", recipe)
    print("[2/7] encoder cache: the frozen base's condition tokens and targets, once", flush=True)
    cfg1 = run_config(recipe, base, world["train"], out / "runs" / "stage1", "stage1", seed=seed)
    cache = build_cache(cfg1, out / "cache", log=lambda *_: None)
    print(f"[3/7] stage 1: training the denoiser on the frozen base CLIP ({recipe.stage1_steps} steps)", flush=True)
    stage1 = train(run_config(recipe, base, cache, out / "runs" / "stage1", "stage1", seed=seed))
    head = "with the denoiser" if recipe.stage2_train_head else "under the frozen denoiser"
    print(f"[4/7] stage 2: LoRA-tuning the vision encoder {head} ({recipe.stage2_steps} steps)", flush=True)
    stage2 = train(run_config(recipe, base, world["train"], out / "runs" / "stage2", "stage2", stage1, seed=seed))
    enhanced = export_model(stage2, out / "enhanced")
    print(f"      exported the enhanced CLIP to {enhanced}", flush=True)
    models = dict(zip(LABELS, (base, enhanced)))
    print("[5/7] evaluating base vs enhanced: text-free probes", flush=True)
    probes = dict(zip(LABELS, run_probes(list(models.values()), recipe.probe_train, recipe.probe_test,
                                         recipe.probe_pairs)))
    print(f"      MMVP-VLM, large ({15 * recipe.large_parts} pairs per pattern) and standard (15)", flush=True)
    large = {label: evaluate_mmvp(model, world["mmvp-large"]) for label, model in models.items()}
    mmvp = {label: evaluate_mmvp(model, world["mmvp"]) for label, model in models.items()}
    print("[6/7] what the denoiser reads through each encoder; reconstructions", flush=True)
    costs = {f"{LABELS[0]} encoder, stage-1 denoiser": read_costs(stage1, recipe.read_scenes),
             f"{LABELS[1]} encoder, stage-2 denoiser": read_costs(stage2, recipe.read_scenes)}
    images = torch.from_numpy(render_many([scene_from_seed(SPLITS["probe"] + i) for i in range(8)]))
    recon = reconstruction_figure(stage2, images.permute(0, 3, 1, 2).float() / 255, out / "reconstructions.png",
                                  recipe.recon_steps)
    print("[7/7] writing the report", flush=True)
    radar_chart(large[LABELS[0]], large[LABELS[1]], LABELS, out / "radar.png")
    loss_curves({"stage 1": stage1, "stage 2": stage2}, out / "loss_curves.png")
    numbers = summary(probes, large)
    results = {"recipe": asdict(recipe), "seed": seed, "fast": fast, "threads": torch.get_num_threads(),
               "seconds": round(time.time() - start), "summary": numbers, "probes": probes, "mmvp_large": large,
               "mmvp": mmvp, "read_costs": costs, "reconstruction_mse": recon, "enhanced": str(enhanced)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    tables = (f"## Summary\n\n{summary_table(numbers)}\n\n"
              f"## Text-free probes of the global embedding (probe seeds)\n\n"
              f"{probe_table(probes[LABELS[0]], probes[LABELS[1]])}\n"
              f"## MMVP-VLM, large ({15 * recipe.large_parts} pairs per pattern)\n\n"
              f"{mmvp_table(large[LABELS[0]], large[LABELS[1]], LABELS)}\n\n"
              f"## MMVP-VLM (15 pairs per pattern)\n\n{mmvp_table(mmvp[LABELS[0]], mmvp[LABELS[1]], LABELS)}\n\n"
              "## What the denoiser reads through each encoder\n\nLoss of each stage's denoiser on 'val' scenes with "
              "each scene's own condition from that stage's encoder, and how much it rises (%) with another scene's "
              "condition or with one attribute changed in the image.\n\n"
              f"{table(costs)}\n\n"
              "What this stage-1 recipe pays for each attribute (oracle: the true attributes as the condition), "
              "measured once by `genhancer miniworld incentive` with one thread (docs/miniworld.md):\n\n"
              f"{shipped_incentive()}\n")
    (out / "report.md").write_text(
        f"# GenHancer in the miniature world\n\nBase: the shipped tiny CLIP. Seed {seed}, "
        f"{'fast' if fast else 'full'} recipe, {results['threads']} torch thread(s), {results['seconds']} s. "
        f"Enhanced CLIP: `{enhanced}`.\n\n{tables}\n"
        "![radar (large MMVP)](radar.png) ![loss curves](loss_curves.png)\n\n"
        "## Reconstructions\n\nColumns: the input (probe scenes); a sample of the stage-2 denoiser from the input's "
        "own global token; a sample from the previous row's image's token. Mean squared error against the input: "
        f"{recon['own']:.4f} with its own condition, {recon['other']:.4f} with another image's.\n\n"
        "![reconstructions](reconstructions.png)\n\n"
        f"## Recipe\n\n{recipe_table(recipe)}\n\nEach stage's whole configuration: `runs/stage1/config.yaml`, "
        "`runs/stage2/config.yaml` (`genhancer config -c FILE` prints every key with its help).\n")
    print("\n" + tables)
    print(f"report: {out / 'report.md'} ({results['seconds']} s); enhanced CLIP: {enhanced}")
    return out
