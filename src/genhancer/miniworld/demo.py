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
    """Sizes and hyper-parameters of one demo run."""

    train_images: int = 2000
    large_parts: int = 7
    stage1_steps: int = 300
    stage2_steps: int = 300
    batch_size: int = 16
    stage1_lr: float = 1e-3
    stage2_lr: float = 1e-3  # chosen on the val split: 1e-4 barely moves the LoRA-tuned encoder in 300 steps
    lora_r: int = 8
    probe_train: int = 2000
    probe_test: int = 1000
    probe_pairs: int = 200
    recon_steps: int = 20


FULL = Recipe()
FAST = Recipe(train_images=32, large_parts=1, stage1_steps=2, stage2_steps=2, batch_size=8, probe_train=90,
              probe_test=45, probe_pairs=8, recon_steps=2)


def run_config(recipe: Recipe, base: str, images: Path, out: Path, stage: str, init_from: Path | None = None,
               seed: int = 0, extra: tuple[str, ...] = ()):
    """The trainer's RunConfig of one stage in the miniature world."""
    from genhancer.config import load_config

    overrides = [
        f"model.backbone={base}", "model.latent=pixel", "model.latent_downsample=2", "model.denoiser=flux-tiny",
        "model.denoiser_arch={patch_size: 4}", "data.source=folder", f"data.path={images}", "data.num_workers=0",
        f"train.batch_size={recipe.batch_size}", "train.grad_accum=1", "train.precision=fp32",
        f"train.output_dir={out}", "train.trackers=[]", "train.log_every=1", f"train.seed={seed}",
        f"stage.stage={stage}", f"stage.lora_r={recipe.lora_r}", f"stage.lora_alpha={recipe.lora_r}",
        f"train.max_steps={recipe.stage1_steps if stage == 'stage1' else recipe.stage2_steps}",
        f"optim.lr={recipe.stage1_lr if stage == 'stage1' else recipe.stage2_lr}",
        f"train.save_every={max(recipe.stage1_steps, recipe.stage2_steps)}", "train.keep_last=1",
    ]
    if init_from is not None:
        overrides.append(f"stage.init_from={init_from}")
    return load_config(overrides=overrides + list(extra))


def write_world(root: Path, recipe: Recipe) -> dict[str, Path]:
    """Training images (train split) and the held-out benchmarks under ``root``."""
    from genhancer.miniworld.benchmark import write_large, write_mmvp
    from genhancer.miniworld.scenes import SPLITS, render, scene_from_seed

    images = root / "train"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(recipe.train_images):
        render(scene_from_seed(SPLITS["train"] + i)).save(images / f"{i:06d}.png")
    return {"train": images, "mmvp": write_mmvp(root / "mmvp"),
            "mmvp-large": write_large(root / "mmvp-large", parts=recipe.large_parts)}


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


def probe_table(base: dict, enhanced: dict) -> str:
    lines = []
    for probe, title in (("linear", "linear probe accuracy (%)"), ("blind_pairs", "blind pairs told apart (%)")):
        keys = list(base[probe])
        lines += [f"| {title} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for label, result in zip(LABELS, (base, enhanced)):
            lines.append(f"| {label} | " + " | ".join(f"{result[probe][k]:.1f}" for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def demo(out: str | Path = "miniworld-demo", fast: bool = False, seed: int = 0) -> Path:
    """Run the demo into ``out`` (which must not exist yet or be empty); returns the report folder."""
    from genhancer.evaluation.report import mmvp_table, radar_chart
    from genhancer.export import export_model
    from genhancer.miniworld.base import shipped_base
    from genhancer.miniworld.benchmark import evaluate_mmvp
    from genhancer.miniworld.probes import run_probes
    from genhancer.miniworld.scenes import SPLITS, render_many, scene_from_seed
    from genhancer.reconstruct import reconstruct_grid
    from genhancer.trainer import train

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty: give a new folder for the demo's report")
    recipe = FAST if fast else FULL
    start = time.time()
    base = str(shipped_base())
    print(f"[1/5] generating the world into {out / 'world'}", flush=True)
    world = write_world(out / "world", recipe)
    print("[2/5] stage 1: training the denoiser on the frozen base CLIP", flush=True)
    stage1 = train(run_config(recipe, base, world["train"], out / "runs" / "stage1", "stage1", seed=seed))
    print("[3/5] stage 2: LoRA-tuning the vision encoder under the frozen denoiser", flush=True)
    stage2 = train(run_config(recipe, base, world["train"], out / "runs" / "stage2", "stage2", stage1, seed=seed))
    enhanced = export_model(stage2, out / "enhanced")
    print("[4/5] evaluating base vs enhanced", flush=True)
    mmvp = {label: evaluate_mmvp(model, world["mmvp"]) for label, model in zip(LABELS, (base, enhanced))}
    large = {label: evaluate_mmvp(model, world["mmvp-large"]) for label, model in zip(LABELS, (base, enhanced))}
    probes = dict(zip(LABELS, run_probes([base, enhanced], recipe.probe_train, recipe.probe_test, recipe.probe_pairs)))
    print("[5/5] writing the report", flush=True)
    radar_chart(mmvp[LABELS[0]], mmvp[LABELS[1]], LABELS, out / "radar.png")
    loss_curves({"stage 1": stage1, "stage 2": stage2}, out / "loss_curves.png")
    images = torch.from_numpy(render_many([scene_from_seed(SPLITS["probe"] + i) for i in range(8)]))
    reconstruct_grid(stage2, images.permute(0, 3, 1, 2).float() / 255, out / "reconstructions.png",
                     steps=recipe.recon_steps)
    results = {"recipe": asdict(recipe), "seed": seed, "fast": fast, "seconds": round(time.time() - start),
               "mmvp": mmvp, "mmvp_large": large, "probes": probes}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    tables = (f"## MMVP-VLM (15 pairs per pattern)\n\n{mmvp_table(mmvp[LABELS[0]], mmvp[LABELS[1]], LABELS)}\n\n"
              f"## MMVP-VLM, large ({15 * recipe.large_parts} pairs per pattern)\n\n"
              f"{mmvp_table(large[LABELS[0]], large[LABELS[1]], LABELS)}\n\n"
              f"## Text-free probes of the global embedding\n\n{probe_table(probes[LABELS[0]], probes[LABELS[1]])}")
    (out / "report.md").write_text(
        f"# GenHancer in the miniature world\n\nBase: the shipped tiny CLIP ({base}). Seed {seed}, "
        f"{'fast' if fast else 'full'} recipe: {asdict(recipe)}. Took {results['seconds']} s.\n\n{tables}\n"
        "![radar](radar.png) ![loss curves](loss_curves.png)\n\n"
        "Reconstructions (top: input, bottom: stage-2 model):\n\n![reconstructions](reconstructions.png)\n")
    print("\n" + tables)
    print(f"report: {out / 'report.md'} ({results['seconds']} s)")
    return out
