"""The miniature world's scene generator: determinism, labels that match pixels, captions, tokenizer."""

import numpy as np
import pytest

from genhancer.miniworld.scenes import (ATTRIBUTES, PATTERNS, RGB, SPLITS, caption, other_value, phrase, render,
                                        scene_from_seed, vocabulary)


def test_same_seed_same_scene_and_pixels():
    assert scene_from_seed(7) == scene_from_seed(7)
    a, b = np.asarray(render(scene_from_seed(7))), np.asarray(render(scene_from_seed(7)))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(render(scene_from_seed(8))))


@pytest.mark.parametrize("size", [32, 64, 96])
def test_any_resolution(size):
    assert render(scene_from_seed(3), size).size == (size, size)


def _colour_pixels(image: np.ndarray, colour: str, tol: int = 40) -> int:
    return int((np.abs(image.astype(int) - np.array(RGB[colour])).max(-1) < tol).sum())


@pytest.mark.parametrize("seed", range(8))
def test_colour_label_matches_pixels(seed):
    scene = scene_from_seed(seed).with_(state="filled", tint=(0, 0, 0), background=(255, 255, 255))
    image = np.asarray(render(scene))
    counts = {c: _colour_pixels(image, c) for c in RGB}
    assert max(counts, key=counts.get) == scene.colour
    assert counts[scene.colour] > 30


def test_count_and_state_change_pixels_as_labelled():
    scene = scene_from_seed(5).with_(state="filled", tint=(0, 0, 0), background=(255, 255, 255), view="close")
    ink = [_colour_pixels(np.asarray(render(scene.with_(count=n))), scene.colour) for n in (1, 2, 3, 4)]
    assert ink == sorted(ink) and ink[3] > 3 * ink[0]
    outlined = _colour_pixels(np.asarray(render(scene.with_(state="outlined"))), scene.colour)
    assert outlined < _colour_pixels(np.asarray(render(scene)), scene.colour)


def test_relation_label_matches_layout():
    scene = scene_from_seed(11).with_(state="filled", mark="none", structure="intact", tint=(0, 0, 0),
                                      background=(255, 255, 255))
    for relation, axis, sign in (("left", 1, -1), ("right", 1, 1), ("above", 0, -1), ("below", 0, 1)):
        image = np.asarray(render(scene.with_(relation=relation))).astype(int)
        objects = np.argwhere((np.abs(image - np.array(RGB[scene.colour])).max(-1) < 40))
        card = np.argwhere(image.max(-1) < 40)  # black glyph and dark card border
        assert sign * (objects[:, axis].mean() - card[:, axis].mean()) > 5, relation


def test_every_attribute_change_changes_pixels():
    scene = scene_from_seed(2)
    base = np.asarray(render(scene))
    for attribute in ATTRIBUTES:
        twin = scene.with_(**{attribute: other_value(scene, attribute, np.random.default_rng(0))})
        assert not np.array_equal(base, np.asarray(render(twin))), attribute


def test_captions_name_objects_and_mention_attributes_with_probability_p():
    rng = np.random.default_rng(0)
    scenes = [scene_from_seed(s) for s in range(300)]
    texts = [caption(s, rng, p=0.2) for s in scenes]
    assert all(t.startswith("a photo of") and "card" in t and s.shape in t for t, s in zip(texts, scenes))
    share = np.mean(["pointing" in t for t in texts])
    assert 0.12 < share < 0.28
    assert all("pointing" not in caption(s, rng, p=0.0) for s in scenes[:50])
    full = phrase(scenes[0], set(ATTRIBUTES))
    assert f"pointing {scenes[0].direction}" in full and f"letter {scenes[0].text}" in full


def test_nine_patterns_and_disjoint_splits():
    assert len(PATTERNS) == 9 and set(PATTERNS) == set(ATTRIBUTES)
    starts = sorted(SPLITS.values())
    assert all(b - a >= 10_000_000 for a, b in zip(starts, starts[1:]))


def test_tokenizer_encodes_every_word_as_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from genhancer.miniworld.base import save_tokenizer

    save_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    for word in vocabulary():
        ids = tok(word).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        pieces = tok(word, add_special_tokens=False).input_ids
        assert len(pieces) == len(__import__("re").findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", word)), word
    assert tok.decode(tok("A photo of two RED squares").input_ids, skip_special_tokens=True) == "a photo of two red squares"
