"""Base vs enhanced report: table layout on given numbers, and the compare command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_fixtures import run_eval_cli, make_mmvp, one_torch_thread, random_image, save_tiny_clip  # noqa: F401

from genhancer.cli import eval as eval_cli
from genhancer.config import ConfigError
from genhancer.evaluation import mmvp, report

# the paper's Table 1, OpenAI ViT-L-14 @224: Original and Ours
ORIGINAL = [13.3, 13.3, 20.0, 20.0, 13.3, 53.3, 20.0, 6.7, 13.3]
OURS = [13.3, 33.3, 33.3, 20.0, 6.7, 73.3, 46.7, 20.0, 40.0]


def _scores(values):
    scores = dict(zip(mmvp.CATEGORIES, values))
    scores["average"] = sum(values) / len(values)
    return scores


def test_mmvp_table_layout():
    table = report.mmvp_table(_scores(ORIGINAL), _scores(OURS), ("Original", "+ Ours")).splitlines()
    assert table[0] == "| Method | " + " | ".join(report.SHORT.values()) + " | Average |"
    assert table[2] == "| Original | 13.3 | 13.3 | 20.0 | 20.0 | 13.3 | 53.3 | 20.0 | 6.7 | 13.3 | 19.2 |"
    assert table[3] == "| + Ours | 13.3 | 33.3 | 33.3 | 20.0 | 6.7 | 73.3 | 46.7 | 20.0 | 40.0 | 31.8 (+12.6) |"
    assert table[4].startswith("| Δ | +0.0 | +20.0 | +13.3 |")


def test_global_table_layout():
    def result(top1, i5, t5):
        r5 = {"text_to_image": {"R@5": i5}, "image_to_text": {"R@5": t5}}
        return {"zeroshot": {"IN-1K": {"top1": top1}}, "retrieval": {"COCO": r5}}

    table = report.global_table(result(75.5, 61.1, 79.2), result(75.6, 61.2, 79.4), ("Original", "Ours"))
    assert table.splitlines() == [
        "| Method | IN-1K top-1 | Image@5 COCO | Text@5 COCO |",
        "| --- | --- | --- | --- |",
        "| Original | 75.5 | 61.1 | 79.2 |",
        "| Ours | 75.6 | 61.2 | 79.4 |",
        "| Δ | +0.1 | +0.1 | +0.2 |",
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    rng = np.random.default_rng(2)
    for name in ("cat", "dog"):
        (root / "cls" / name).mkdir(parents=True)
        random_image(rng).save(root / "cls" / name / "0.jpg")
    random_image(rng).save(root / "a.jpg")
    random_image(rng).save(root / "b.jpg")
    (root / "pairs.csv").write_text("image,caption\na.jpg,a cat\nb.jpg,a dog\n")
    models = {"base": save_tiny_clip(root / "base", seed=0), "enhanced": save_tiny_clip(root / "enh", seed=1)}
    return {"mmvp": make_mmvp(root / "mmvp"), "cls": root / "cls", "pairs": root / "pairs.csv", **models}


def test_compare_end_to_end(data, tmp_path, capsys):
    out = tmp_path / "report"
    run_eval_cli(["eval", "compare", str(data["base"]), str(data["enhanced"]), "--mmvp", str(data["mmvp"]),
          "--zeroshot", f"Pets={data['cls']}", "--retrieval", str(data["pairs"]), "--templates", "single",
          "--out", str(out), "--device", "cpu"])  # fmt: skip
    md = (out / "report.md").read_text()
    assert "## MMVP-VLM (Table 1 layout)" in md and "| Original |" in md and "| Ours |" in md
    assert "| Method | Pets top-1 | Image@5 pairs | Text@5 pairs |" in md
    assert (out / "mmvp_radar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    full = json.loads((out / "report.json").read_text())
    assert set(full["base"]["mmvp"]) == {*mmvp.CATEGORIES, "average"}
    assert full["enhanced"]["zeroshot"]["Pets"]["num_images"] == 2
    assert full["base"]["retrieval"]["pairs"]["text_to_image"]["R@5"] == 100.0
    assert (out / "base" / "mmvp_predictions.csv").is_file() and (out / "enhanced" / "mmvp_scores.json").is_file()
    assert "Table 3 layout" in capsys.readouterr().out


def test_compare_user_errors(data, tmp_path):
    with pytest.raises(ConfigError, match="nothing to compare"):
        run_eval_cli(["eval", "compare", str(data["base"]), str(data["enhanced"])])
    with pytest.raises(ConfigError, match="dataset name 'cls' given twice"):
        run_eval_cli(["eval", "compare", "a", "b", "--zeroshot", str(data["cls"]), "--zeroshot", str(data["cls"])])
    with pytest.raises(ConfigError, match="Questions.csv not found"):
        run_eval_cli(["eval", "compare", "a", "b", "--mmvp", str(tmp_path)])
