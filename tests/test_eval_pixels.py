"""The evaluation's bulk preprocessing gives the image processor's pixel values bit for bit, or defers to it."""

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

from genhancer.evaluation.pixels import pixel_batches, plan, worker_thread
from genhancer.miniworld.base import shipped_base

SIZES = [(64, 64), (97, 64), (64, 131), (300, 211), (33, 90), (1, 1)]


def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


@pytest.mark.parametrize("processor", [
    CLIPImageProcessorPil.from_pretrained(shipped_base()),  # shortest edge 64, centre crop 64
    CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 24}),
    SiglipImageProcessorPil(size={"height": 48, "width": 40}),  # fixed size, no crop, mean = std = 0.5
], ids=["miniworld-clip", "clip-rect-crop", "siglip"])
def test_bulk_pixels_equal_the_processors(processor):
    assert plan(processor) is not None  # the fast path is taken
    imgs = images()
    with ThreadPoolExecutor(2) as pool:  # two threads: the batches still come in order
        got = torch.cat(list(pixel_batches(processor, imgs.__getitem__, len(imgs), 4, pool)))
    expected = torch.cat([processor(images=[im], return_tensors="pt")["pixel_values"] for im in imgs])
    assert torch.equal(got, expected)


def test_an_image_smaller_than_the_crop_and_other_settings_go_through_the_processor():
    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 24, "width": 24})  # pads
    imgs = images()
    with worker_thread() as worker:
        got = torch.cat(list(pixel_batches(processor, imgs.__getitem__, len(imgs), 4, worker)))
    assert torch.equal(got, torch.cat([processor(images=[im], return_tensors="pt")["pixel_values"] for im in imgs]))
    assert plan(CLIPImageProcessorPil(do_pad=True, pad_size={"height": 80, "width": 80})) is None


def test_batches_are_prepared_ahead_of_the_caller():
    """All the work is queued when pixel_batches returns: the worker decodes while the caller runs the model."""
    processor = CLIPImageProcessorPil.from_pretrained(shipped_base())
    imgs, loaded = images(), []
    load = lambda i: loaded.append(i) or imgs[i]
    with ThreadPoolExecutor(1) as pool:
        batches = pixel_batches(processor, load, len(imgs), 2, pool)
    # the pool has finished (shutdown waits) though no batch was asked for: image 0 (the plan's check), then all
    assert loaded == [0] + list(range(len(imgs)))
    assert len(list(batches)) == 3


def test_an_error_cancels_the_work_still_queued():
    processor = CLIPImageProcessorPil.from_pretrained(shipped_base())
    img, loaded = images()[0], []

    def load(i):
        loaded.append(i)
        if i == 1:
            raise ValueError("image 1 is broken")
        time.sleep(0.01 if i > 1 else 0)
        return img

    with pytest.raises(ValueError, match="image 1 is broken"), worker_thread() as worker:
        for _ in pixel_batches(processor, load, 200, 1, worker):
            pass
    # batch 1 failed; at most the batch under way when the error reached the caller ran after it, not 198 more
    assert max(loaded) <= 3
