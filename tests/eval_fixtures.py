"""Offline builders for the evaluation tests: tiny random CLIP / SigLIP models saved with processor and tokenizer,
an MMVP-format benchmark of generated images, and a literal pair-by-pair port of the MMVP reference evaluation.

SigLIP's own tokenizer needs sentencepiece, which is not installed here; the tiny SigLIP ships a word-level
``tokenizers`` tokenizer instead (saved as tokenizer.json, loaded by AutoTokenizer), which exercises the same
"pad to the tokenizer's max length" path.
"""

from __future__ import annotations

import csv
import os
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
)

from genhancer.evaluation.mmvp import CATEGORIES

@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run a module's tests on one intra-op thread: tiny models gain nothing from more, and on a loaded machine
    two spinning threads made these tests ~40x slower. Import this fixture into a test module to apply it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WORDS = "a photo of the dog cat car tree is facing left right up down red blue two three open closed text".split()
TYPES = [c.split()[0] for c in CATEGORIES]  # one image folder per category, like the benchmark's
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer over single characters (no merges): every lowercase text tokenises."""
    chars = string.ascii_lowercase + string.digits + ".,'-!?"
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[])


def siglip_tokenizer(max_length: int = 16) -> PreTrainedTokenizerFast:
    """A word-level tokenizer appending ``</s>`` like SigLIP's, padding to ``max_length``."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def save_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A random CLIPModel (2 layers, width 32, patch 8) saved with its processor and tokenizer."""
    tokenizer = clip_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    config = CLIPConfig(
        text_config=dict(TOWER, vocab_size=len(tokenizer), max_position_embeddings=77, **ids),
        vision_config=dict(TOWER, image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=image_size).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def save_tiny_siglip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A random SiglipModel (2 layers, width 32, patch 8) saved with its processor and a word-level tokenizer."""
    tokenizer = siglip_tokenizer()
    config = SiglipConfig(
        text_config=dict(TOWER, vocab_size=len(tokenizer), max_position_embeddings=16, projection_size=32),
        vision_config=dict(TOWER, image_size=image_size, patch_size=8),
    )
    torch.manual_seed(seed)
    model = SiglipModel(config)
    with torch.no_grad():  # SigLIP's default init gives logit_scale 0 and a -10 bias; spread the probabilities
        model.logit_scale.fill_(np.log(10.0))
    model.save_pretrained(path)
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def random_image(rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A blocky random RGB image (4x4 colour cells upsampled) so that tiny models see distinct inputs."""
    cells = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((size, size), Image.NEAREST)


def make_mmvp(root: str | Path, folder: str = "MLLM_VLM Images", seed: int = 0) -> Path:
    """A full-size MMVP-VLM layout (270 questions, 135 pairs, 15 per category) of generated images."""
    root, rng = Path(root), np.random.default_rng(seed)
    rows = []
    for qid in range(1, 271):
        qtype = TYPES[(qid - 1) // 30]
        statement = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 8))))
        rows.append([qid, qtype, statement])
        (root / folder / qtype).mkdir(parents=True, exist_ok=True)
        random_image(rng).save(root / folder / qtype / f"{qid}.jpg")
    write_questions(root, rows)
    return root


def write_questions(root: str | Path, rows: list[list]) -> None:
    with open(Path(root) / "Questions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Question ID", "Type", "Statement"])
        writer.writerows(rows)


def reference_mmvp(model_dir: str | Path, family: str, benchmark_dir: str | Path):
    """The MMVP-VLM reference evaluation, transcribed loop for loop from its transformers port.

    Returns (per-pair rows ``[qid1, qid2, pred1, pred2, gt1, gt2, q1score, q2score]``, category scores + average).
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    model = (CLIPModel if family == "clip" else SiglipModel).from_pretrained(model_dir).eval().float()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tok_kwargs = dict(max_length=77) if family == "clip" else {}
    image_dir = os.path.join(benchmark_dir, "MLLM_VLM Images")
    categories = list(CATEGORIES)
    pair_accuracies = {category: 0 for category in categories}
    num_pairs, rows = 0, []
    with open(os.path.join(benchmark_dir, "Questions.csv")) as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            qid1, qtype1, statement1 = row
            qid2, _, statement2 = next(reader)
            qid1, qid2 = int(qid1), int(qid2)
            img1 = Image.open(os.path.join(image_dir, qtype1, f"{qid1}.jpg"))
            img2 = Image.open(os.path.join(image_dir, qtype1, f"{qid2}.jpg"))
            texts = [
                tokenizer("a photo of " + s, truncation=True, padding="max_length", return_tensors="pt",
                          **tok_kwargs)["input_ids"]
                for s in (statement1, statement2)
            ]  # fmt: skip
            imgs = torch.cat([processor.preprocess(im, return_tensors="pt")["pixel_values"] for im in (img1, img2)])
            with torch.no_grad():
                probs1 = model(input_ids=texts[0], pixel_values=imgs).logits_per_text.softmax(dim=-1).numpy()
                probs2 = model(input_ids=texts[1], pixel_values=imgs).logits_per_text.softmax(dim=-1).numpy()
            pred1 = "img1" if probs1[0][0] > 0.5 else "img2"
            pred2 = "img1" if probs2[0][0] > 0.5 else "img2"
            gt1 = "img1" if qid1 % 2 == 1 else "img2"
            gt2 = "img1" if qid2 % 2 == 1 else "img2"
            rows.append([qid1, qid2, pred1, pred2, gt1, gt2, probs1[0][0], probs2[0][0]])
            if pred1 == gt1 and pred2 == gt2:
                pair_accuracies[categories[num_pairs // 15]] += 1
            num_pairs += 1
    scores = []
    for category in pair_accuracies:
        pair_accuracies[category] = (pair_accuracies[category] / (num_pairs // len(categories))) * 100
        scores.append(pair_accuracies[category])
    pair_accuracies["average"] = sum(scores) / len(scores)
    return rows, pair_accuracies


def run_eval_cli(argv: list[str]) -> None:
    """Parse and run ``genhancer eval ...`` through the real command registration, letting ConfigError through."""
    import argparse

    from genhancer.cli import eval as eval_cli

    parser = argparse.ArgumentParser()
    eval_cli.add_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    args.func(args)
