"""Zero-shot image-text retrieval: image->text and text->image recall@1/5/10 on image-caption pairs.

Pairs come from a CSV (header with an image column ``image``/``filepath``/``file``/``path`` and a caption column
``caption``/``text``/``title``; rows sharing an image are that image's captions, as in Flickr30k / COCO with five
each) or from webdataset shards (an image under ``jpg``/``jpeg``/``png``/``webp`` and captions under ``txt`` or
``json`` with ``caption`` (a string) or ``captions`` (a list)). Similarity is the cosine of the embeddings; an image
retrieves its texts correctly at k when any of its captions is among the k nearest texts.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

import torch

from genhancer.errors import ConfigError
from genhancer.evaluation.models import EvalModel, read_image
from genhancer.images import SHARD_IMAGE_KEYS

KS = (1, 5, 10)
IMAGE_COLUMNS = ("image", "filepath", "file", "path")
CAPTION_COLUMNS = ("caption", "text", "title")


@dataclass
class CaptionedImages:
    """Images (paths or encoded bytes) and captions; ``text_image[t]`` is the index of caption t's image."""

    images: list = field(default_factory=list)  # Path or bytes
    names: list[str] = field(default_factory=list)  # how errors name each image
    captions: list[str] = field(default_factory=list)
    text_image: list[int] = field(default_factory=list)

    def add(self, image, name: str, captions: list[str]) -> None:
        self.text_image += [len(self.images)] * len(captions)
        self.captions += captions
        self.images.append(image)
        self.names.append(name)

    def read(self, i: int):
        image = self.images[i]
        return read_image(io.BytesIO(image) if isinstance(image, bytes) else image, self.names[i])


def load_pairs(spec: str, image_root: str | None = None) -> CaptionedImages:
    """Image-caption pairs from a CSV/TSV file or webdataset shards (a .tar, a glob, a brace pattern, a folder)."""
    path = Path(spec)
    if path.suffix.lower() in (".csv", ".tsv"):
        data = _load_csv(path, Path(image_root) if image_root else path.parent)
    else:
        data = _load_shards(spec)
    if not data.captions:
        raise ConfigError(f"--data {spec}: no image-caption pairs found")
    return data


def _load_csv(path: Path, image_root: Path) -> CaptionedImages:
    if not path.is_file():
        raise ConfigError(f"--data {path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        columns = reader.fieldnames or []
        image_col = next((c for c in IMAGE_COLUMNS if c in columns), None)
        caption_col = next((c for c in CAPTION_COLUMNS if c in columns), None)
        if image_col is None or caption_col is None:
            raise ConfigError(
                f"{path} line 1: header needs an image column ({'/'.join(IMAGE_COLUMNS)}) and a caption column "
                f"({'/'.join(CAPTION_COLUMNS)}), got {','.join(columns)!r}"
            )
        grouped: dict[str, tuple[int, list[str]]] = {}  # image -> (first line, captions), in file order
        for row in reader:
            image, caption = (row[image_col] or "").strip(), (row[caption_col] or "").strip()
            if not image or not caption:
                raise ConfigError(f"{path} line {reader.line_num}: empty {image_col if not image else caption_col}")
            grouped.setdefault(image, (reader.line_num, []))[1].append(caption)
    data = CaptionedImages()
    for image, (line, captions) in grouped.items():
        full = image_root / image
        if not full.is_file():
            raise ConfigError(f"{path} line {line}: image {full} not found")
        data.add(full, f"{path} line {line}: {full}", captions)
    return data


def _shard_urls(spec: str) -> list[str]:
    path = Path(spec)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
    elif any(ch in spec for ch in "*?["):
        urls = sorted(glob(spec))
    else:
        import braceexpand  # a webdataset dependency

        urls = list(braceexpand.braceexpand(spec))
    missing = [u for u in urls if not Path(u).is_file()]
    if not urls or missing:
        what = f"shard {missing[0]} not found" if missing else "no shard matches"
        raise ConfigError(f"--data {spec}: {what} (give a .csv/.tsv or webdataset .tar shards)")
    return urls


def _captions(sample: dict, where: str) -> list[str]:
    captions = []
    if "txt" in sample:
        captions = [sample["txt"].decode("utf-8")]
    elif "json" in sample:
        meta = json.loads(sample["json"])
        found = meta.get("captions", meta.get("caption")) if isinstance(meta, dict) else None
        captions = [found] if isinstance(found, str) else list(found or [])
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        raise ConfigError(f"{where}: no caption (expected a .txt or a .json with 'caption' / 'captions')")
    return captions


def _load_shards(spec: str) -> CaptionedImages:
    import webdataset as wds

    data = CaptionedImages()
    dataset = wds.WebDataset(_shard_urls(spec), shardshuffle=False, empty_check=False)
    for sample in dataset:  # raw bytes: images are decoded batch by batch, errors name the shard and key
        where = f"{sample['__url__']} sample {sample['__key__']}"
        key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
        if key is None:
            raise ConfigError(f"{where}: no image (expected one of {', '.join(SHARD_IMAGE_KEYS)})")
        data.add(sample[key], f"{where}.{key}", _captions(sample, where))
    return data


def recall_at_k(sim: torch.Tensor, text_image: torch.Tensor, ks=KS) -> dict[str, dict[str, float]]:
    """Recall@k in % from ``(I, T)`` image-text similarities; ``text_image``: ``(T,)`` image index of each text.

    Ties are broken by ``torch.topk``'s order.
    """
    n_images, n_texts = sim.shape
    text_image = text_image.to(sim.device)
    top_texts = sim.topk(min(max(ks), n_texts), dim=1).indices  # (I, k): nearest texts of each image
    i2t = text_image[top_texts] == torch.arange(n_images, device=sim.device)[:, None]
    top_images = sim.T.topk(min(max(ks), n_images), dim=1).indices  # (T, k): nearest images of each text
    t2i = top_images == text_image[:, None]
    return {
        "image_to_text": {f"R@{k}": i2t[:, :k].any(dim=1).sum().item() / n_images * 100 for k in ks},
        "text_to_image": {f"R@{k}": t2i[:, :k].any(dim=1).sum().item() / n_texts * 100 for k in ks},
    }


def evaluate(model: EvalModel, spec: str, image_root: str | None = None, batch_size: int = 32) -> dict:
    """Image->text and text->image recall@1/5/10 (%) on a CSV or webdataset of image-caption pairs."""
    data = load_pairs(spec, image_root)
    images = model.normalize(model.embed_images(data.read, len(data.images), batch_size))
    texts = model.normalize(model.embed_texts(data.captions, batch_size, desc="captions"))
    result = recall_at_k(images @ texts.T, torch.tensor(data.text_image))
    return {**result, "num_images": len(data.images), "num_texts": len(data.captions)}
