"""MMVP-VLM: batched == pair-by-pair == a literal port of the reference evaluation; protocol rules; bad input."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from eval_fixtures import (  # noqa: F401 (one_torch_thread is an autouse fixture)
    run_eval_cli,
    make_mmvp,
    one_torch_thread,
    reference_mmvp,
    save_tiny_clip,
    save_tiny_siglip,
    write_questions,
)

from genhancer.cli import eval as eval_cli
from genhancer.config import ConfigError
from genhancer.evaluation import mmvp
from genhancer.evaluation.models import load_model


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_mmvp(tmp_path_factory.mktemp("mmvp"))


@pytest.fixture(scope="module", params=["clip", "siglip"])
def tiny(request, tmp_path_factory):
    save = save_tiny_clip if request.param == "clip" else save_tiny_siglip
    return request.param, save(tmp_path_factory.mktemp(request.param))


def test_batched_and_pairwise_equal_the_reference(tiny, bench):
    family, model_dir = tiny
    ref_rows, ref_scores = reference_mmvp(model_dir, family, bench)
    model = load_model(str(model_dir), device="cpu")
    for result in (mmvp.evaluate(model, bench, batch_size=7), mmvp.evaluate_pairwise(model, bench)):
        rows = [[r[k] for k in ("qid1", "qid2", "pred1", "pred2", "gt1", "gt2")] for r in result.rows]
        assert rows == [r[:6] for r in ref_rows]
        assert result.scores == ref_scores  # exact float equality, average included
        probs = np.array([[r["q1score"], r["q2score"]] for r in result.rows])
        np.testing.assert_allclose(probs, np.array([r[6:] for r in ref_rows], dtype=np.float32), atol=1e-5)
    # the picks are not all one way: the comparison above is not vacuous
    assert len({r["pred1"] for r in result.rows}) == 2


def test_tokenize_gives_the_tokenizers_ids_as_int64(tiny):
    model = load_model(str(tiny[1]), device="cpu")
    texts = [mmvp.PROMPT + s for s in ("a red square", "two small circles left of a big one", "")]
    length = 77 if tiny[0] == "clip" else model.tokenizer.model_max_length
    ids = model.tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    got = model.tokenize(texts)
    assert got.dtype == torch.int64 and torch.equal(got, ids["input_ids"])


def test_batch_size_does_not_change_results(bench, tmp_path):
    model = load_model(str(save_tiny_clip(tmp_path / "m")), device="cpu")
    a, b = mmvp.evaluate(model, bench, batch_size=1), mmvp.evaluate(model, bench, batch_size=270)
    assert [r["pred1"] + r["pred2"] for r in a.rows] == [r["pred1"] + r["pred2"] for r in b.rows]
    assert a.scores == b.scores


def test_near_ties_are_recomputed_by_the_reference_forward(bench, tmp_path):
    model = load_model(str(save_tiny_clip(tmp_path / "m")), device="cpu")
    pairwise = mmvp.evaluate_pairwise(model, bench)
    rechecked = mmvp.evaluate(model, bench, recheck_band=1.0)  # every pair counts as a near tie
    assert [r["q1score"] for r in rechecked.rows] == [r["q1score"] for r in pairwise.rows]  # bit for bit
    assert [r["q2score"] for r in rechecked.rows] == [r["q2score"] for r in pairwise.rows]


def test_exact_tie_picks_image_2(tmp_path):
    root = make_mmvp(tmp_path / "b")
    images = root / "MLLM_VLM Images" / "Orientation"
    shutil.copy(images / "1.jpg", images / "2.jpg")
    _edit(root, lambda rows: [rows[0], [2, rows[1][1], rows[0][2]]] + rows[2:])  # same statements, same images
    row = mmvp.evaluate(load_model(str(save_tiny_clip(tmp_path / "m")), device="cpu"), root).rows[0]
    assert row["q1score"] == row["q2score"] == 0.5
    assert (row["pred1"], row["pred2"], row["correct"]) == ("img2", "img2", 0)


def test_ground_truth_and_categories():
    assert [mmvp.ground_truth(q) for q in (1, 2, 3, 4, 269, 270)] == [1, 2, 1, 2, 1, 2]
    assert mmvp.category_of(0) == mmvp.category_of(14) == "Orientation and Direction"
    assert mmvp.category_of(15) == "Presence of Specific Features"
    assert mmvp.category_of(119) == "Texts"
    assert mmvp.category_of(134) == "Viewpoint and Perspective"


def _pairs(n=mmvp.NUM_PAIRS):
    return [mmvp.Pair((2 * k + 2, 2 * k + 3), (2 * k + 1, 2 * k + 2), "T", ("s", "t"), (None, None)) for k in range(n)]


def test_score_arithmetic_on_hand_made_probabilities():
    probs = np.zeros((mmvp.NUM_PAIRS, 2), dtype=np.float32)  # image 2 for both statements: wrong for the odd one
    probs[:, 0] = 0.9  # statement 1 -> image 1 (right), statement 2 -> image 2 (right): all pairs correct ...
    probs[15:30, 1] = 0.6  # ... except category 2, whose second statement now picks image 1
    probs[30:31, 0] = 0.5  # an exact tie picks image 2: wrong for statement 1 (one pair of category 3)
    probs[45:47, 0] = np.float32(0.5) + np.float32(6e-8)  # just above 0.5: image 1, still right
    result = mmvp.score(_pairs(), probs)
    assert result.scores["Presence of Specific Features"] == 0.0
    assert result.scores["State and Condition"] == (14 / 15) * 100
    assert result.scores["Quantity and Count"] == 100.0
    expected = [100.0, 0.0, (14 / 15) * 100] + [100.0] * 6
    assert result.scores["average"] == sum(expected) / 9
    assert result.correct_pairs == 135 - 16
    assert result.rows[30]["pred1"] == "img2" and result.rows[30]["gt1"] == "img1" and result.rows[30]["correct"] == 0
    assert result.rows[15]["pred2"] == "img1" and result.rows[15]["gt2"] == "img2"


@pytest.mark.parametrize("folder", mmvp.IMAGE_FOLDERS)
def test_image_folder_names(tmp_path, folder):
    root = make_mmvp(tmp_path, folder=folder)
    pairs = mmvp.load_benchmark(root)
    assert len(pairs) == 135 and pairs[0].images[0] == root / folder / "Orientation" / "1.jpg"
    assert pairs[-1].qids == (269, 270)


def test_pair_images_come_from_the_first_rows_type(tmp_path):
    root = make_mmvp(tmp_path)
    rows = list(csv.reader(open(root / "Questions.csv")))[1:]
    rows[1][1] = "Elsewhere"  # second row's Type is ignored, as in the reference
    write_questions(root, rows)
    assert mmvp.load_benchmark(root)[0].images[1] == root / "MLLM_VLM Images" / "Orientation" / "2.jpg"


def _edit(root, edit):
    rows = list(csv.reader(open(root / "Questions.csv")))[1:]
    write_questions(root, edit(rows))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda rows: rows[:-1], "odd number: line 270 has no partner"),
        (lambda rows: rows[:5] + [["x5", *rows[5][1:]]] + rows[6:], "line 7: Question ID 'x5' is not a number"),
        (lambda rows: [rows[1], rows[0]] + rows[2:], "lines 2-3: a pair is an odd Question ID followed by"),
        (lambda rows: rows[:-2], "holds 134 pairs"),
        (lambda rows: rows[:4] + [[rows[4][0], "Presence", rows[4][2]]] + rows[5:], "line 6: pair (5, 6) of Type "
         "'Presence' is pair 3 of category 'Orientation and Direction'"),
        (lambda rows: rows[:3] + [rows[3][:2]] + rows[4:], "line 5: expected 3 fields"),
    ],
)  # fmt: skip
def test_bad_questions_csv(tmp_path, edit, message):
    root = make_mmvp(tmp_path)
    _edit(root, edit)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mmvp.load_benchmark(root)


def test_category_with_other_than_15_pairs(tmp_path):
    root = make_mmvp(tmp_path)

    def shift(rows):  # category 1 gets 16 pairs, category 2 gets 14
        for row in rows[30:32]:
            row[1] = rows[0][1]
        return rows

    _edit(root, shift)
    with pytest.raises(ConfigError, match="line 32: pair \\(31, 32\\) of Type 'Orientation' is pair 1 of category "
                                          "'Presence of Specific Features'.*exactly 15 consecutive pairs"):  # fmt: skip
        mmvp.load_benchmark(root)


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="Questions.csv not found"):
        mmvp.load_benchmark(tmp_path)
    root = make_mmvp(tmp_path / "b")
    (root / "MLLM_VLM Images" / "Color" / "152.jpg").unlink()
    with pytest.raises(ConfigError, match=r"line 153 \(Question ID 152\): image .*Color/152.jpg not found"):
        mmvp.load_benchmark(root)
    (root / "MLLM_VLM Images" / "Color" / "152.jpg").mkdir()  # a folder of the image's name is no image
    with pytest.raises(ConfigError, match=r"line 153 \(Question ID 152\): image .*Color/152.jpg not found"):
        mmvp.load_benchmark(root)
    (root / "MLLM_VLM Images" / "Color" / "152.jpg").rmdir()
    (root / "MLLM_VLM Images" / "Color" / "152.jpg").symlink_to(root / "MLLM_VLM Images" / "Color" / "151.jpg")
    assert len(mmvp.load_benchmark(root)) == 135  # a link to an image is one
    shutil.rmtree(root / "MLLM_VLM Images" / "Color")  # a whole Type folder missing
    with pytest.raises(ConfigError, match=r"line 152 \(Question ID 151\): image .*Color/151.jpg not found"):
        mmvp.load_benchmark(root)
    shutil.rmtree(root / "MLLM_VLM Images")
    with pytest.raises(ConfigError, match="no image folder"):
        mmvp.load_benchmark(root)


def test_unreadable_image_names_file_and_line(tmp_path):
    root = make_mmvp(tmp_path / "b")
    (root / "MLLM_VLM Images" / "Orientation" / "3.jpg").write_bytes(b"not a jpeg")
    model = load_model(str(save_tiny_clip(tmp_path / "m")), device="cpu")
    for run in (lambda: mmvp.evaluate(model, root), lambda: mmvp.evaluate_pairwise(model, root)):
        with pytest.raises(ConfigError, match=r"Questions.csv line 4 \(Question ID 3\): .*3.jpg: cannot read image"):
            run()


def test_cli_writes_predictions_and_scores(tmp_path, bench, capsys):
    model_dir = save_tiny_clip(tmp_path / "m")
    run_eval_cli(["eval", "mmvp", "--model", str(model_dir), "--benchmark", str(bench), "--out", str(tmp_path / "o")])
    rows = list(csv.DictReader(open(tmp_path / "o" / "mmvp_predictions.csv")))
    assert len(rows) == 135 and rows[0]["qid1"] == "1" and rows[0]["gt2"] == "img2"
    summary = json.loads((tmp_path / "o" / "mmvp_scores.json").read_text())
    assert summary["protocol"] == "batched" and summary["num_pairs"] == 135
    assert set(summary["scores"]) == {*mmvp.CATEGORIES, "average"}
    assert summary["correct_pairs"] == sum(int(r["correct"]) for r in rows)
    assert "pairs correct" in capsys.readouterr().out


def test_load_model_errors(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(ConfigError, match="is a 'bert' model; evaluation needs a CLIP or SigLIP model"):
        load_model(str(tmp_path / "bert"))
    model_dir = save_tiny_clip(tmp_path / "clip")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    with pytest.raises(ConfigError, match="its tokenizer has 2 tokens for a text tower of 86"):
        load_model(str(model_dir))
    model_dir = save_tiny_clip(tmp_path / "clip2")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="cannot load its weights"):
        load_model(str(model_dir))


def test_cli_user_errors(tmp_path, bench):
    with pytest.raises(ConfigError, match="model 'nope' not found"):
        run_eval_cli(["eval", "mmvp", "--model", "nope", "--benchmark", str(bench)])
    with pytest.raises(ConfigError, match="Questions.csv not found"):
        run_eval_cli(["eval", "mmvp", "--model", "nope", "--benchmark", str(tmp_path)])
