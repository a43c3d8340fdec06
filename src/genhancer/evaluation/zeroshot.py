"""Zero-shot classification on an image-folder dataset (one sub-folder per class), top-1 and top-5.

Each class's text embedding is the mean of its L2-normalised prompt embeddings, normalised again (CLIP's prompt
ensembling); an image's prediction is the class of highest cosine similarity. The logit scale and SigLIP's bias are
monotone, so they do not change a ranking and are left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from genhancer.errors import ConfigError
from genhancer.evaluation.models import EvalModel, read_image
from genhancer.images import IMAGE_EXTENSIONS, image_files

# CLIP's seven-prompt ensemble for ImageNet (Radford et al., 2021, prompt-engineering notebook)
ENSEMBLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
SINGLE_TEMPLATE = ("a photo of a {}.",)


def resolve_templates(spec: str) -> tuple[str, ...]:
    """``"ensemble"``, ``"single"``, or a text file of templates (one per line, each holding ``{}``)."""
    if spec == "ensemble":
        return ENSEMBLE_TEMPLATES
    if spec == "single":
        return SINGLE_TEMPLATE
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--templates {spec}: not 'ensemble', 'single' or an existing file of templates")
    templates = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ConfigError(f"{path}: every line must be a template holding '{{}}' for the class name, got {bad[:1]}")
    return templates


def load_image_folder(root: str | Path, classnames: str | Path | None = None):
    """``(image paths, labels, class names)`` of a folder with one sub-folder per class (sorted by folder name).

    Class names are the folder names with ``_`` as spaces, or come from ``classnames``: a JSON object
    ``{folder: name}`` or a text file of one name per line in sorted folder order.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"--data {root}: not a directory of class folders")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ConfigError(f"--data {root}: no class folders inside (expected one sub-folder per class)")
    names = [f.name.replace("_", " ") for f in folders]
    if classnames is not None:
        names = _read_classnames(Path(classnames), [f.name for f in folders])
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = image_files(folder, recursive=False)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ConfigError(f"--data {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return paths, torch.tensor(labels), names


def _read_classnames(path: Path, folders: list[str]) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"--classnames {path}: file not found")
    if path.suffix == ".json":
        mapping = json.loads(path.read_text())
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise ConfigError(f"{path}: no class name for folder {missing[0]!r} ({len(missing)} missing)")
        return [mapping[f] for f in folders]
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != len(folders):
        raise ConfigError(f"{path}: {len(names)} class names for {len(folders)} class folders (one per line)")
    return names


def class_embeddings(model: EvalModel, names: list[str], templates, batch_size: int) -> torch.Tensor:
    """``(C, D)`` unit class embeddings: mean over templates of unit prompt embeddings, renormalised."""
    prompts = [t.format(name) for name in names for t in templates]
    embeds = model.normalize(model.embed_texts(prompts, batch_size, desc="class prompts"))
    return model.normalize(embeds.view(len(names), len(templates), -1).mean(dim=1))


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy in % of ``(N, C)`` logits against ``(N,)`` labels; k is capped at C."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, k_max)
    hits = top == labels.to(top.device)[:, None]
    return {f"top{k}": hits[:, :k].any(dim=1).sum().item() / len(labels) * 100 for k in ks}


def evaluate(model: EvalModel, root, templates=ENSEMBLE_TEMPLATES, classnames=None, batch_size: int = 32) -> dict:
    """Zero-shot top-1 / top-5 accuracy (%) on an image-folder dataset."""
    paths, labels, names = load_image_folder(root, classnames)
    classes = class_embeddings(model, names, templates, batch_size)
    images = model.normalize(model.embed_images(lambda i: read_image(paths[i]), len(paths), batch_size))
    result = topk_accuracy(images @ classes.T, labels)
    return {**result, "num_images": len(paths), "num_classes": len(names), "num_templates": len(templates)}
