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
