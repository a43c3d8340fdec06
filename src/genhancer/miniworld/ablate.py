"""The paper's ablations in miniature: each study is a list of variants (config overrides of the demo recipe),
run over seeds on the shipped base CLIP (the demo's recipe at half the steps: 150 + 150) and scored on the held-out large MMVP benchmark and the text-free probes.

Studies (paper reference): ``timesteps`` (Table 4), ``condition`` (Fig. 5), ``stages`` (Fig. 6), ``finetune``
(Fig. 8), ``size`` (Table 5), ``denoiser`` (Table 6: continuous vs discrete; needs the discrete denoiser and a VQ
latent space) and ``curve`` (reconstruction loss vs representation score across stage-2 training steps).
Each writes ``results.jsonl`` (one line per run), ``table.md`` (mean +- std over seeds) and ``plot.png``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from genhancer.config import ConfigError

STUDIES: dict[str, dict[str, tuple[str, ...]]] = {
    "timesteps": {
        "uniform": ("objective.timestep_sampling=uniform",),
        **{f"logit-normal s={s}": ("objective.timestep_sampling=logit-normal", f"objective.logit_normal_scale={s}")
           for s in (0.1, 0.5, 1, 5, 10)},
    },
    "condition": {
        "[CLS]": ("model.condition=cls",),
        **{f"[CLS]+{int(r * 100)}% local": ("model.condition=cls+local", f"model.local_ratio={r}")
           for r in (0.1, 0.25, 0.5, 1.0)},
    },
    "stages": {"two-stage": (), "end-to-end": ("stage.stage=e2e",)},
    "finetune": {"LoRA": ("stage.finetune=lora",), "full": ("stage.finetune=full",)},
    "size": {f"n={n}": (f"model.denoiser_arch={{patch_size: 4, depth_double: {n}}}",) for n in (1, 2, 3)},
    "denoiser": {"continuous": ()},
    "curve": {"stage 2": ()},
}
METRICS = ("mmvp_large", "linear_probe", "blind_pairs")
BASE = "base (not tuned)"


def _score(model_dir: Path, benchmark: Path, recipe) -> dict[str, float]:
    from genhancer.miniworld.benchmark import evaluate_mmvp
    from genhancer.miniworld.probes import run_probes

    probes = run_probes([model_dir], recipe.probe_train, recipe.probe_test, recipe.probe_pairs)[0]
    return {"mmvp_large": evaluate_mmvp(model_dir, benchmark)["average"],
            "linear_probe": probes["linear"]["average"], "blind_pairs": probes["blind_pairs"]["average"]}


def run_variant(overrides: tuple[str, ...], seed: int, world: dict[str, Path], work: Path, recipe) -> list[dict]:
    """Train one variant with one seed; returns its scores (several rows for the ``curve`` study)."""
    from genhancer.export import export_model
    from genhancer.miniworld.base import shipped_base
    from genhancer.miniworld.demo import run_config
    from genhancer.trainer import train

    base = str(shipped_base())
    if "stage.stage=e2e" in overrides:
        e2e = replace(recipe, stage2_steps=recipe.stage1_steps + recipe.stage2_steps)
        final = train(run_config(e2e, base, world["train"], work / "e2e", "stage2", seed=seed, extra=overrides))
    else:
        stage1 = train(run_config(recipe, base, world["train"], work / "stage1", "stage1", seed=seed, extra=overrides))
        final = train(run_config(recipe, base, world["train"], work / "stage2", "stage2", stage1, seed=seed,
                                 extra=overrides))
    checkpoints = sorted((final / "checkpoints").glob("step-*"))
    rows = []
    losses = [json.loads(line) for line in (final / "metrics.jsonl").read_text().splitlines()]
    for ckpt in checkpoints:
        step = int(ckpt.name.split("-")[1])
        window = [r["loss"] for r in losses if step - 10 < r["step"] <= step]
        exported = export_model(ckpt, work / f"export-{step}")
        rows.append({"step": step, "loss": float(np.mean(window)), **_score(exported, world["mmvp-large"], recipe)})
    return rows


def summarise(rows: list[dict], variants: list[str]) -> str:
    """Markdown table of mean +- std over seeds per variant (final step of each run)."""
    lines = ["| variant | " + " | ".join(METRICS) + " | seeds |", "|---" * (len(METRICS) + 2) + "|"]
    for name in variants:
        mine = [r for r in rows if r["variant"] == name and r["final"]]
        cells = [f"{np.mean([r[m] for r in mine]):.1f} ± {np.std([r[m] for r in mine]):.1f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(mine)} |")
    return "\n".join(lines)


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


def ablate(study: str, seeds: int = 3, out: str | Path = "miniworld-ablate", fast: bool = False) -> Path:
    """Run every variant of ``study`` with seeds 0..seeds-1; write results.jsonl, table.md and plot.png."""
    from genhancer.miniworld.base import shipped_base
    from genhancer.miniworld.demo import FAST, FULL, write_world

    if study == "denoiser":
        raise ConfigError("study 'denoiser' needs the discrete denoiser's VQ latent space for the miniature world, "
                          "which is not wired yet; run the other studies")
    out = Path(out)
    recipe = FAST if fast else replace(FULL, stage1_steps=150, stage2_steps=150, probe_train=1000, probe_test=500,
                                       probe_pairs=100)
    world = write_world(out / "world", recipe)
    variants = {BASE: (), **STUDIES[study]}
    rows = [{"variant": BASE, "seed": 0, "final": True, "step": 0, "loss": float("nan"),
             **_score(shipped_base(), world["mmvp-large"], recipe)}]
    (out / "results.jsonl").write_text(json.dumps(rows[0]) + "\n")
    if study == "curve":
        every = ("train.save_every=" + str(max(1, recipe.stage2_steps // 5)), "train.keep_last=100")
    for name, overrides in STUDIES[study].items():
        if study == "curve":
            overrides = (*overrides, *every)
        for seed in range(seeds):
            work = out / "runs" / f"{name.replace(' ', '_').replace('%', 'pct')}-seed{seed}"
            if work.exists():
                shutil.rmtree(work)
            result = run_variant(overrides, seed, world, work, recipe)
            for i, row in enumerate(result):
                rows.append({"variant": name, "seed": seed, "final": i == len(result) - 1, **row})
            with open(out / "results.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows[-len(result):])
            for export in work.glob("export-*"):
                shutil.rmtree(export)
    table = summarise(rows, list(variants))
    (out / "table.md").write_text(f"# Ablation '{study}' ({seeds} seeds; stage 1 {recipe.stage1_steps} + "
                                  f"stage 2 {recipe.stage2_steps} steps)\n\n"
                                  f"{table}\n")
    plot(rows, list(variants), study, out / "plot.png")
    print(table)
    return out
