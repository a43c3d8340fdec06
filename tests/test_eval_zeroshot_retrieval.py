"""Zero-shot classification and retrieval: metrics on hand-computed tensors, data loading, end to end, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import webdataset as wds
from eval_fixtures import run_eval_cli, one_torch_thread, random_image, save_tiny_clip, save_tiny_siglip  # noqa: F401

from genhancer.cli import eval as eval_cli
from genhancer.config import ConfigError
from genhancer.evaluation import retrieval, zeroshot
from genhancer.evaluation.models import load_model


def test_topk_accuracy_hand_computed():
    logits = torch.tensor([
        [0.9, 0.1, 0.0, 0.2, 0.3, 0.4],  # label 0: rank 1
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: rank 5
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: rank 6
        [0.0, 0.0, 0.9, 0.8, 0.0, 0.0],  # label 3: rank 2
    ])  # fmt: skip
    result = zeroshot.topk_accuracy(logits, torch.tensor([0, 1, 5, 3]))
    assert result == {"top1": 25.0, "top5": 75.0}
    assert zeroshot.topk_accuracy(logits[:, :3], torch.tensor([0, 1, 2, 2])) == {"top1": 50.0, "top5": 100.0}


def test_recall_at_k_hand_computed():
    # 3 images; texts 0,1 -> image 0, text 2 -> image 1, text 3 -> image 2
    sim = torch.tensor([
        [0.9, 0.1, 0.8, 0.0],
        [0.7, 0.2, 0.3, 0.1],
        [0.1, 0.5, 0.0, 0.4],
    ])  # fmt: skip
    result = retrieval.recall_at_k(sim, torch.tensor([0, 0, 1, 2]), ks=(1, 2, 10))
    # image->text: image 0 top text 0 (hit); image 1 ranks texts 0,2 -> hit at 2; image 2 ranks 1,3 -> hit at 2
    assert result["image_to_text"] == pytest.approx({"R@1": 100 / 3, "R@2": 100.0, "R@10": 100.0})
    # text->image: text 0 -> image 0 (hit@1); text 1 -> 2,1,0 (rank 3); text 2 -> 0,1 (rank 2); text 3 -> 2 (hit@1)
    assert result["text_to_image"] == {"R@1": 50.0, "R@2": 75.0, "R@10": 100.0}


def test_class_embeddings_average_unit_prompts():
    class Fake:  # embeds prompt i as a one-hot scaled by i + 1: the mean must use unit vectors
        normalize = staticmethod(lambda x: x / x.norm(dim=-1, keepdim=True))

        def embed_texts(self, prompts, batch_size, desc=""):
            return torch.stack([torch.eye(4)[i % 2] * (i + 1) for i in range(len(prompts))])

    classes = zeroshot.class_embeddings(Fake(), ["cat", "dog"], ("a {}.", "the {}."), batch_size=3)
    expected = torch.tensor([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0]]) / 2**0.5
    torch.testing.assert_close(classes, expected)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    for name in ("red_car", "dog", "tree"):
        (root / name).mkdir()
        for i in range(2):
            random_image(rng).save(root / name / f"{i}.jpg")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_and_classnames(folder, tmp_path):
    paths, labels, names = zeroshot.load_image_folder(folder)
    assert names == ["dog", "red car", "tree"] and labels.tolist() == [0, 0, 1, 1, 2, 2] and len(paths) == 6
    (tmp_path / "names.json").write_text(json.dumps({"dog": "puppy", "red_car": "car", "tree": "oak"}))
    assert zeroshot.load_image_folder(folder, tmp_path / "names.json")[2] == ["puppy", "car", "oak"]
    (tmp_path / "names.txt").write_text("puppy\ncar\n")
    with pytest.raises(ConfigError, match="2 class names for 3 class folders"):
        zeroshot.load_image_folder(folder, tmp_path / "names.txt")
    with pytest.raises(ConfigError, match="no class folders"):
        zeroshot.load_image_folder(tmp_path)


def test_templates():
    assert zeroshot.resolve_templates("single") == ("a photo of a {}.",)
    assert len(zeroshot.resolve_templates("ensemble")) == 7
    with pytest.raises(ConfigError, match="not 'ensemble', 'single'"):
        zeroshot.resolve_templates("nope.txt")


@pytest.mark.parametrize("save", [save_tiny_clip, save_tiny_siglip])
def test_zeroshot_end_to_end(save, folder, tmp_path):
    model = load_model(str(save(tmp_path / "m")), device="cpu")
    result = zeroshot.evaluate(model, folder, zeroshot.SINGLE_TEMPLATE, batch_size=4)
    assert result["num_images"] == 6 and result["num_classes"] == 3 and result["num_templates"] == 1
    assert result["top1"] == pytest.approx(round(result["top1"] * 6 / 100) * 100 / 6) and result["top5"] == 100.0


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """4 images with 2, 1, 1, 1 captions as a CSV and as a webdataset shard."""
    root = tmp_path_factory.mktemp("ret")
    rng = np.random.default_rng(1)
    rows = [("a.jpg", "a red car"), ("b.jpg", "two dogs"), ("a.jpg", "a car that is red"), ("c.jpg", "a tree"),
            ("d.jpg", "the cat is up")]  # fmt: skip
    lines = ["image,caption"]
    for name in sorted({image for image, _ in rows}):
        random_image(rng).save(root / name)
    lines += [f"{image},{caption}" for image, caption in rows]
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    with wds.TarWriter(str(root / "shard-000.tar")) as sink:
        for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg"]):
            captions = [caption for image, caption in rows if image == name]
            meta = {"captions": captions} if len(captions) > 1 else {"caption": captions[0]}
            sink.write({"__key__": f"{i:04d}", "jpg": (root / name).read_bytes(), "json": json.dumps(meta).encode()})
    return root


def test_pairs_from_csv_and_shards_agree(captioned):
    from_csv = retrieval.load_pairs(str(captioned / "pairs.csv"))
    assert from_csv.captions == ["a red car", "a car that is red", "two dogs", "a tree", "the cat is up"]
    assert from_csv.text_image == [0, 0, 1, 2, 3]
    from_shards = retrieval.load_pairs(str(captioned / "shard-{000..000}.tar"))
    assert from_shards.captions == from_csv.captions and from_shards.text_image == from_csv.text_image
    assert np.array_equal(np.asarray(from_shards.read(1)), np.asarray(from_csv.read(1)))


@pytest.mark.parametrize("save", [save_tiny_clip, save_tiny_siglip])
def test_retrieval_end_to_end(save, captioned, tmp_path):
    model = load_model(str(save(tmp_path / "m")), device="cpu")
    result = retrieval.evaluate(model, str(captioned / "pairs.csv"), batch_size=3)
    assert result["num_images"] == 4 and result["num_texts"] == 5
    assert result["image_to_text"]["R@10"] == result["text_to_image"]["R@10"] == 100.0
    assert 0 <= result["text_to_image"]["R@1"] <= result["text_to_image"]["R@5"] == 100.0


def test_retrieval_bad_input(captioned, tmp_path):
    (tmp_path / "bad.csv").write_text("file,label\nx.jpg,a\n")
    with pytest.raises(ConfigError, match="bad.csv line 1: header needs an image column"):
        retrieval.load_pairs(str(tmp_path / "bad.csv"))
    (tmp_path / "missing.csv").write_text("image,caption\na.jpg,one\nzz.jpg,two\n")
    with pytest.raises(ConfigError, match="missing.csv line 3: image .*zz.jpg not found"):
        retrieval.load_pairs(str(tmp_path / "missing.csv"), image_root=str(captioned))
    with wds.TarWriter(str(tmp_path / "nocap.tar")) as sink:
        sink.write({"__key__": "k1", "jpg": b"\xff\xd8 broken"})
    with pytest.raises(ConfigError, match="nocap.tar sample k1: no caption"):
        retrieval.load_pairs(str(tmp_path / "nocap.tar"))
    with pytest.raises(ConfigError, match="no shard matches"):
        retrieval.load_pairs(str(tmp_path / "none-*.tar"))


def test_cli_zeroshot_and_retrieval(folder, captioned, tmp_path, capsys):
    model_dir = str(save_tiny_clip(tmp_path / "m"))
    run_eval_cli(["eval", "zeroshot", "--model", model_dir, "--data", str(folder), "--out", str(tmp_path / "z")])
    assert json.loads((tmp_path / "z" / "zeroshot.json").read_text())["num_templates"] == 7
    run_eval_cli(["eval", "retrieval", "--model", model_dir, "--data", str(captioned / "shard-000.tar"),
          "--out", str(tmp_path / "r")])  # fmt: skip
    assert set(json.loads((tmp_path / "r" / "retrieval.json").read_text())["image_to_text"]) == {"R@1", "R@5", "R@10"}
    assert "top-1" in capsys.readouterr().out
