"""MMVP-VLM-format benchmarks of the miniature world, from held-out seeds.

Each pair is one scene and the same scene with one attribute changed (nuisance factors kept); its two statements
name only that attribute, e.g. "some squares pointing up and a card" vs "... pointing left ...". The standard
directory (15 pairs per category) is what ``genhancer eval mmvp`` reads unchanged; the large version is several
such directories ("parts") from consecutive seeds, scored by the same evaluator and averaged, so a category's
score moves in steps of 100 / (15 x parts) points instead of 6.7.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from tqdm import tqdm

from genhancer.miniworld.scenes import ATTRIBUTES, PATTERNS, SPLITS, Scene, other_value, phrase, render, scene_from_seed

PAIRS_PER_CATEGORY = 15
IMAGE_FOLDER = "MLLM_VLM Images"  # the folder the official MMVP-VLM and GenHancer scripts read


def make_pair(seed: int, attribute: str) -> tuple[Scene, Scene]:
    """A scene and its twin differing only in ``attribute``, both determined by ``seed``."""
    scene = scene_from_seed(seed)
    twin = scene.with_(**{attribute: other_value(scene, attribute, np.random.default_rng([seed, 1]))})
    return scene, twin


def pair_seed(first_seed: int, category: int, index: int) -> int:
    return first_seed + category * 100_000 + index


def write_mmvp(out_dir: str | Path, first_seed: int = SPLITS["mmvp"], size: int = 64, desc: str = "benchmark") -> Path:
    """Write one MMVP-VLM directory: Questions.csv + "MLLM_VLM Images"/<Type>/<id>.jpg, 9 x 15 pairs."""
    out = Path(out_dir)
    rows = []
    qid = 1
    for c, attribute in enumerate(tqdm(list(ATTRIBUTES), desc=desc, disable=None, leave=False)):
        folder = out / IMAGE_FOLDER / PATTERNS[attribute]
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(PAIRS_PER_CATEGORY):
            for scene in make_pair(pair_seed(first_seed, c, i), attribute):
                render(scene, size).save(folder / f"{qid}.jpg", quality=95)
                rows.append([qid, PATTERNS[attribute], phrase(scene, {attribute})])
                qid += 1
    with open(out / "Questions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Question ID", "Type", "Statement"])
        writer.writerows(rows)
    return out


def write_large(out_dir: str | Path, parts: int = 7, first_seed: int = SPLITS["mmvp-large"], size: int = 64) -> Path:
    """Write ``parts`` MMVP-VLM directories ``part-XX`` (15 pairs per category each) from consecutive seeds."""
    out = Path(out_dir)
    for k in range(parts):
        write_mmvp(out / f"part-{k:02d}", first_seed + k * PAIRS_PER_CATEGORY, size, desc=f"part {k + 1}/{parts}")
    return out


LARGE_OFFSET = 1_000_000  # a fresh draw from N: the large version from N + this (the standard takes N .. N + 800,014)


def write_benchmarks(root: str | Path, parts: int = 7, first_seed: int | None = None) -> dict[str, Path]:
    """``<root>/mmvp`` (standard) and ``<root>/mmvp-large`` (``parts`` parts): from their held-out splits, or a fresh
    draw, the standard version from ``first_seed`` on and the large one from ``first_seed + LARGE_OFFSET``."""
    root = Path(root)
    if first_seed is None:
        return {"mmvp": write_mmvp(root / "mmvp"), "mmvp-large": write_large(root / "mmvp-large", parts)}
    return {"mmvp": write_mmvp(root / "mmvp", first_seed),
            "mmvp-large": write_large(root / "mmvp-large", parts, first_seed + LARGE_OFFSET)}


def benchmark_parts(root: str | Path) -> list[Path]:
    """The MMVP directories of a benchmark: itself, or its ``part-XX`` folders."""
    root = Path(root)
    if (root / "Questions.csv").is_file():
        return [root]
    return sorted(p for p in root.glob("part-*") if (p / "Questions.csv").is_file())


def evaluate_mmvp(model_dir: str | Path, root: str | Path) -> dict[str, float]:
    """Per-category and average MMVP-VLM scores (%) of a model, averaged over the benchmark's parts."""
    from genhancer.evaluation.mmvp import evaluate
    from genhancer.evaluation.models import load_model

    model = load_model(str(model_dir), device="cpu")
    results = [evaluate(model, part).scores for part in benchmark_parts(root)]
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}
