"""The paper's ablations in miniature: each study is a list of variants (config overrides of the demo recipe),
run over seeds on the shipped base CLIP with the demo's protocol (its full recipe, stage 1 from the encoder cache, its
probe sizes: at half the steps no variant moved the probes, docs/miniworld.md) and scored on the held-out large MMVP
benchmark and the text-free probes, so that a study's rows compare with the demo's. ``split="val"`` scores on the val
seeds instead (the large MMVP and the probes drawn from them): the protocol for choosing a recipe, which must never
look at the held-out scores.

Studies (paper reference): ``timesteps`` (Table 4), ``condition`` (Fig. 5), ``stages`` (Fig. 6), ``finetune``
(Fig. 8), ``head`` (Fig. 9: the denoiser frozen or trained in stage 2), ``size`` (Table 5), ``denoiser`` (Table 6: the continuous ``flux-mini`` in the 2x-downsampled pixel space
vs the discrete ``perceiver-tiny`` over a tiny f8 VQ tokenizer trained on the world's train images into
``<out>/vq``) and ``curve`` (reconstruction loss vs representation score across stage-2 training steps).
Each writes ``results.jsonl`` (one line per run), ``table.md`` (mean +- std over seeds) and ``plot.png``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from genhancer.errors import ConfigError


# The discrete variant's tokenizer: ``configs/vq/tiny.json`` with a fourth level (f8: a 64 px scene -> 8 x 8 = 64
# codes, as many tokens as the continuous head's 8 x 8 patches of the 32 px pixel space) and narrower early levels
# so that it trains in ~2-3 min on one CPU core. Trained once per ablation folder on the train-split images only
# (seed 0), cached in ``<out>/vq``; ~0.7 M parameters, not shipped.
VQ_CONFIG = {
    "_class_name": "VQModel", "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 16, 32, 64], "layers_per_block": 1, "act_fn": "silu", "latent_channels": 16,
    "vq_embed_dim": 16, "num_vq_embeddings": 256, "norm_num_groups": 16, "sample_size": 64, "scaling_factor": 1.0,
    "norm_type": "group", "mid_block_add_attention": False,
}
VQ_STEPS, VQ_BATCH, VQ_LR = 400, 16, 1e-3
VQ_DIR = "<world-vq>"  # replaced by the ablation's tokenizer folder when a variant runs
STUDIES: dict[str, dict[str, tuple[str, ...]]] = {
    "timesteps": {
        "uniform": ("objective.timestep_sampling=uniform",),
        **{f"logit-normal s={s}": ("objective.timestep_sampling=logit-normal", f"objective.logit_normal_scale={s}")
           for s in (0.1, 0.5, 1, 5, 10)},
        # the demo's s = 0.1 with a share of uniform draws, so that the head also learns the t its sampler visits
        **{f"logit-normal s=0.1 + {int(p * 100)}% uniform": ("objective.timestep_sampling=logit-normal",
                                                             "objective.logit_normal_scale=0.1",
                                                             f"objective.uniform_share={p}") for p in (0.1, 0.25)},
        # ... or only while stage 1 trains the head (stage 2's gradient to the encoder keeps the concentrated draw)
        "logit-normal s=0.1 + 25% uniform in stage 1": ("objective.timestep_sampling=logit-normal",
                                                        "objective.logit_normal_scale=0.1",
                                                        "stage1:objective.uniform_share=0.25"),
        # the demo's s = 0.1 centred elsewhere than m = 1 (t near 0.73): 0.62, 0.82 and 0.88
        **{f"logit-normal s=0.1, m={m}": ("objective.timestep_sampling=logit-normal",
                                          "objective.logit_normal_scale=0.1", f"objective.logit_normal_mean={m}")
           for m in (0.5, 1.5, 2)},
    },
    "condition": {
        "[CLS]": ("model.condition=cls",),
        **{f"[CLS]+{int(r * 100)}% local": ("model.condition=cls+local", f"model.local_ratio={r}")
           for r in (0.1, 0.25, 0.5, 1.0)},
    },
    "stages": {"two-stage": (), "end-to-end": ("stage.stage=e2e",)},
    "finetune": {"LoRA": ("stage.finetune=lora",), "full": ("stage.finetune=full",)},
    "head": {"frozen": ("stage.train_head=false",), "trained": ("stage.train_head=true",)},
    "size": {f"n={n}": (f"model.denoiser_arch={{patch_size: 4, depth_double: {n}}}",) for n in (1, 2, 3)},
    # perceiver-tiny widened to the flux-mini head's width (128, 4 heads) with 4 layers: 1.12 M vs 1.28 M parameters
    # (projector included); both see 64 tokens (8 x 8 VQ codes / 8 x 8 patches of the 32 px pixel space)
    "denoiser": {
        "continuous (flux-mini)": (),
        "discrete (perceiver-tiny)": ("model.latent=vq", f"model.latent_path={VQ_DIR}", "model.denoiser=perceiver-tiny",
                                      "model.denoiser_arch={width: 128, heads: 4, depth: 4}"),
    },
    "curve": {"stage 2": ()},
}
METRICS = ("blind_probe", "mmvp_large", "coarse_probe", "blind_pairs", "linear_probe", "recon_own", "recon_other")
RECON_SCENES = 64  # the first scenes of the split, reconstructed by the final head from their own / another's token
PROBE_SPLIT = {"held-out": "probe", "val": "val"}  # what a study is scored on -> the probes' seed split
BASE = "base (not tuned)"


def resolve(overrides: tuple[str, ...], vq_dir: Path | None) -> tuple[str, ...]:
    """``overrides`` with the VQ placeholder replaced by ``vq_dir``."""
    return tuple(o.replace(VQ_DIR, str(vq_dir)) for o in overrides)


def world_vq(images: Path, out: Path, steps: int = VQ_STEPS, seed: int = 0) -> Path:
    """The tiny f8 VQ tokenizer of the world, trained on ``images`` (train split) into ``out`` unless already there."""
    import torch

    from genhancer.vq import folder_images, train_vq

    if (out / "config.json").is_file():
        return out
    space, losses = train_vq(folder_images(str(images), 64), str(out), VQ_CONFIG, steps=steps, batch_size=VQ_BATCH,
                             lr=VQ_LR, seed=seed, device="cpu")
    with torch.no_grad():
        x = folder_images(str(images), 64)[:256]
        codes = space.encode(x)
        stats = {"steps": steps, "final_loss": losses[-1], "recon_mse": float(((space.decode(codes) - x) ** 2).mean()),
                 "image_variance": float(x.var()), "codes_used": int(codes.unique().numel()),
                 "grid": list(codes.shape[1:])}
    (out / "vq_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"VQ tokenizer: {stats}", flush=True)
    return out


def _score(model_dir: Path, benchmark: Path, recipe, split: str) -> dict[str, float]:
    from genhancer.miniworld.benchmark import evaluate_mmvp
    from genhancer.miniworld.probes import run_probes

    from genhancer.miniworld.demo import BLIND, COARSE

    probes = run_probes([model_dir], recipe.probe_train, recipe.probe_test, recipe.probe_pairs,
                        split=PROBE_SPLIT[split])[0]
    return {"mmvp_large": evaluate_mmvp(model_dir, benchmark)["average"],
            "blind_probe": float(np.mean([probes["linear"][a] for a in BLIND])),
            "coarse_probe": float(np.mean([probes["linear"][a] for a in COARSE])),
            "linear_probe": probes["linear"]["average"], "blind_pairs": probes["blind_pairs"]["average"]}


def for_stage(overrides: tuple[str, ...], stage: str) -> tuple[str, ...]:
    """The overrides that apply to ``stage``: unscoped ones, and ``"stage1:key=value"`` ones of that stage, unscoped."""
    mine = []
    for o in overrides:
        scope, _, rest = o.partition(":")
        if "=" in scope:  # no scope (a value may hold ':')
            mine.append(o)
        elif scope == stage:
            mine.append(rest)
    return tuple(mine)


def run_variant(overrides: tuple[str, ...], seed: int, world: dict[str, Path], work: Path, recipe,
                split: str = "held-out") -> list[dict]:
    """Train one variant with one seed; returns its scores (several rows for the ``curve`` study)."""
    from genhancer.cache import build_cache
    from genhancer.export import export_model
    from genhancer.miniworld.base import shipped_base
    from genhancer.miniworld.demo import run_config
    from genhancer.trainer import train

    base = str(shipped_base())
    if "stage.stage=e2e" in overrides:  # every step tunes the encoder: no cache
        e2e = replace(recipe, stage2_steps=recipe.stage1_steps + recipe.stage2_steps)
        final = train(run_config(e2e, base, world["train"], work / "e2e", "stage2", seed=seed,
                                 extra=for_stage(overrides, "stage2")))
    else:
        s1, s2 = for_stage(overrides, "stage1"), for_stage(overrides, "stage2")
        cfg1 = run_config(recipe, base, world["train"], work / "stage1", "stage1", seed=seed, extra=s1)
        cache = build_cache(cfg1, work / "cache", log=lambda *_: None)
        stage1 = train(run_config(recipe, base, cache, work / "stage1", "stage1", seed=seed, extra=s1))
        shutil.rmtree(cache)
        final = train(run_config(recipe, base, world["train"], work / "stage2", "stage2", stage1, seed=seed,
                                 extra=s2))
    checkpoints = sorted((final / "checkpoints").glob("step-*"))
    rows = []
    losses = [json.loads(line) for line in (final / "metrics.jsonl").read_text().splitlines()]
    for ckpt in checkpoints:
        step = int(ckpt.name.split("-")[1])
        window = [r["loss"] for r in losses if step - 10 < r["step"] <= step]
        exported = export_model(ckpt, work / f"export-{step}")
        scores = _score(exported, world["mmvp-large"], recipe, split)
        rows.append({"step": step, "loss": float(np.mean(window)), **scores, **NO_RECON})
    rows[-1].update(_reconstruction(final, work / "reconstructions.png", recipe, split))
    return rows


NO_RECON = {"recon_own": float("nan"), "recon_other": float("nan")}  # the base has no head; earlier curve steps


def _reconstruction(run: Path, path: Path, recipe, split: str) -> dict[str, float]:
    """Mean squared error of the run's samples from each scene's own and from another scene's token (the demo's
    reconstruction measure, on the split's first ``RECON_SCENES`` scenes); the grid of the first 8 goes to ``path``."""
    import torch

    from genhancer.miniworld.demo import reconstruction_figure
    from genhancer.miniworld.scenes import SPLITS, render_many, scene_from_seed

    first = SPLITS[PROBE_SPLIT[split]]
    images = torch.from_numpy(render_many([scene_from_seed(first + i) for i in range(RECON_SCENES)]))
    mse = reconstruction_figure(run, images.permute(0, 3, 1, 2).float() / 255, path, recipe.recon_steps, grid=8)
    return {"recon_own": mse["own"], "recon_other": mse["other"]}


def summarise(rows: list[dict], variants: list[str]) -> str:
    """Markdown table of mean +- std over seeds per variant (final step of each run)."""
    lines = ["| variant | " + " | ".join(METRICS) + " | seeds |", "|---" * (len(METRICS) + 2) + "|"]
    for name in variants:
        mine = [r for r in rows if r["variant"] == name and r["final"]]
        cells = [_cell([r[m] for r in mine], 4 if m.startswith("recon") else 1) for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(mine)} |")
    return "\n".join(lines)


def _cell(values: list[float], digits: int) -> str:
    """mean ± std, or a dash where the variant has no such value (the base's reconstructions)."""
    if np.isnan(values).any():
        return "-"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def plot(rows: list[dict], variants: list[str], study: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(METRICS), 3.5))
    if study == "curve":
        ax = fig.add_subplot()
        tuned = [r for r in rows if r["variant"] != BASE]
        ax.scatter([r["loss"] for r in tuned], [r["mmvp_large"] for r in tuned], c=[r["step"] for r in tuned])
        ax.set_xlabel("stage-2 denoising loss (reconstruction, lower is better)")
        ax.set_ylabel("MMVP-VLM large, average (%)")
    else:
        for i, metric in enumerate(METRICS):
            ax = fig.add_subplot(1, len(METRICS), i + 1)
            values = [[r[metric] for r in rows if r["variant"] == v and r["final"]] for v in variants]
            ax.bar(range(len(variants)), [np.mean(v) for v in values], yerr=[np.std(v) for v in values], capsize=3)
            ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
            ax.set_title(metric)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def ablate(study: str, seeds: int = 3, out: str | Path = "miniworld-ablate", fast: bool = False,
           variants: tuple[str, ...] = (), split: str = "held-out", seed_from: int = 0) -> Path:
    """Run the ``variants`` of ``study`` (default: all) with seeds ``seed_from .. seed_from + seeds - 1`` against the
    base, scored on ``split`` ("held-out" or "val"); write results.jsonl, table.md and plot.png."""
    from genhancer.miniworld.base import shipped_base
    from genhancer.miniworld.demo import FAST, FULL, write_world

    if study not in STUDIES:
        raise ConfigError(f"unknown study '{study}': choose one of {', '.join(STUDIES)}")
    unknown = [v for v in variants if v not in STUDIES[study]]
    if unknown:
        raise ConfigError(f"unknown variant '{unknown[0]}' of study '{study}': choose among "
                          + ", ".join(f"'{v}'" for v in STUDIES[study]))
    chosen = {name: o for name, o in STUDIES[study].items() if not variants or name in variants}
    out = Path(out)
    recipe = FAST if fast else FULL
    world = write_world(out / "world", recipe, split)
    vq_dir = world_vq(world["train"], out / "vq", steps=2 if fast else VQ_STEPS) if study == "denoiser" else None
    names = [BASE, *chosen]
    rows = [{"variant": BASE, "seed": 0, "final": True, "step": 0, "loss": float("nan"),
             **_score(shipped_base(), world["mmvp-large"], recipe, split), **NO_RECON}]
    (out / "results.jsonl").write_text(json.dumps(rows[0]) + "\n")
    if study == "curve":
        every = ("train.save_every=" + str(max(1, recipe.stage2_steps // 5)), "train.keep_last=100")
    for name, overrides in chosen.items():
        if study == "curve":
            overrides = (*overrides, *every)
        overrides = resolve(overrides, vq_dir)
        for seed in range(seed_from, seed_from + seeds):
            work = out / "runs" / f"{name.replace(' ', '_').replace('%', 'pct')}-seed{seed}"
            if work.exists():
                shutil.rmtree(work)
            result = run_variant(overrides, seed, world, work, recipe, split)
            for i, row in enumerate(result):
                rows.append({"variant": name, "seed": seed, "final": i == len(result) - 1, **row})
            with open(out / "results.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows[-len(result):])
            for export in work.glob("export-*"):
                shutil.rmtree(export)
    table = summarise(rows, names)
    (out / "table.md").write_text(f"# Ablation '{study}' ({seeds} seeds; stage 1 {recipe.stage1_steps} + "
                                  f"stage 2 {recipe.stage2_steps} steps; scored on the {split} seeds)\n\n"
                                  f"{table}\n")
    plot(rows, names, study, out / "plot.png")
    print(table)
    return out
