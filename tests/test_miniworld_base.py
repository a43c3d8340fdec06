"""The shipped tiny base CLIP, the MMVP-format benchmark and the probes of the miniature world."""

import csv

import pytest
import torch
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from genhancer.miniworld.base import shipped_base
from genhancer.miniworld.benchmark import benchmark_parts, write_large, write_mmvp
from genhancer.miniworld.scenes import PATTERNS, render, scene_from_seed


def test_shipped_base_loads_with_standard_from_pretrained_calls():
    path = shipped_base()
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    assert (path / "model.safetensors").stat().st_size < 6_000_000
    assert (path / "README.md").is_file()
    texts = ["a photo of two red squares and a card", "a photo of some circles pointing up and a card"]
    inputs = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    pixels = processor(images=[render(scene_from_seed(s)) for s in (0, 1)], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 64, 64)
    with torch.no_grad():
        out = model(input_ids=inputs.input_ids, pixel_values=pixels)
    assert out.logits_per_text.shape == (2, 2) and torch.isfinite(out.logits_per_text).all()


def test_shipped_base_loads_with_every_standard_class():
    import transformers as tf

    path = str(shipped_base())
    image = render(scene_from_seed(7))
    vision = tf.CLIPVisionModel.from_pretrained(path).eval()
    with_projection = tf.CLIPVisionModelWithProjection.from_pretrained(path).eval()
    text = tf.CLIPTextModelWithProjection.from_pretrained(path).eval()
    full = CLIPModel.from_pretrained(path).eval()
    processor = tf.AutoProcessor.from_pretrained(path)
    inputs = processor(text=["a photo of some red squares and a card"], images=[image], return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        image_embeds = with_projection(pixel_values=inputs["pixel_values"]).image_embeds
        text_embeds = text(input_ids=inputs["input_ids"]).text_embeds
        reference = full(**inputs)
        hidden = vision(pixel_values=inputs["pixel_values"]).pooler_output
    assert image_embeds.shape == text_embeds.shape == (1, 64) and hidden.shape == (1, 96)
    unit = torch.nn.functional.normalize  # CLIPModel's output embeddings are normalised, the towers' are not
    torch.testing.assert_close(unit(image_embeds, dim=-1), reference.image_embeds)
    torch.testing.assert_close(unit(text_embeds, dim=-1), reference.text_embeds)
    classify = tf.pipeline("zero-shot-image-classification", model=path)
    labels = ["some red squares and a card", "some blue circles and a card"]
    assert {r["label"] for r in classify(image, candidate_labels=labels)} == set(labels)


def test_shipped_tokenizer_json_is_in_the_format_old_tokenizers_read():
    import json

    bpe = json.loads((shipped_base() / "tokenizer.json").read_text())["model"]
    assert "ignore_merges" not in bpe and bpe["merges"] and all(isinstance(m, str) and m.count(" ") == 1
                                                                 for m in bpe["merges"])
    fast = CLIPTokenizer.from_pretrained(shipped_base())
    from transformers import CLIPTokenizerFast

    text = "a photo of three blue diamonds pointing left above a card showing the letter k"
    assert CLIPTokenizerFast.from_pretrained(shipped_base())(text).input_ids == fast(text).input_ids


@pytest.fixture(scope="module")
def mmvp_dir(tmp_path_factory):
    return write_mmvp(tmp_path_factory.mktemp("mmvp") / "mmvp")


def test_benchmark_passes_the_mmvp_evaluators_format_checks(mmvp_dir):
    from genhancer.evaluation.mmvp import CATEGORIES, load_benchmark

    pairs = load_benchmark(mmvp_dir)
    assert len(pairs) == 135
    assert [p.type for p in pairs[::15]] == list(CATEGORIES) == list(PATTERNS.values())
    with open(mmvp_dir / "Questions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Question ID", "Type", "Statement"] and len(rows) == 271
    assert all(p.statements[0] != p.statements[1] for p in pairs)


def test_benchmark_is_deterministic_and_held_out(tmp_path, mmvp_dir):
    again = write_mmvp(tmp_path / "again")
    assert (again / "Questions.csv").read_text() == (mmvp_dir / "Questions.csv").read_text()
    image = "MLLM_VLM Images/Texts/211.jpg"
    assert (again / image).read_bytes() == (mmvp_dir / image).read_bytes()


def test_large_benchmark_is_parts_of_the_standard_format(tmp_path):
    from genhancer.evaluation.mmvp import load_benchmark

    root = write_large(tmp_path / "large", parts=2)
    parts = benchmark_parts(root)
    assert len(parts) == 2
    first, second = (load_benchmark(p) for p in parts)
    assert [p.statements for p in first] != [p.statements for p in second]


def test_mmvp_evaluation_and_probes_run_on_the_shipped_base(mmvp_dir):
    from genhancer.miniworld.benchmark import evaluate_mmvp
    from genhancer.miniworld.probes import run_probes

    scores = evaluate_mmvp(shipped_base(), mmvp_dir)
    assert set(scores) == set(PATTERNS.values()) | {"average"}
    probes = run_probes([shipped_base()], n_train=90, n_test=45, n_pairs=4)[0]
    assert set(probes) == {"linear", "blind_pairs"}
    assert all(0 <= v <= 100 for table in probes.values() for v in table.values())
