"""The evaluation's bulk preprocessing gives the image processor's pixel values bit for bit, or defers to it."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

from genhancer.evaluation.pixels import pixel_batches, plan
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
    got = torch.cat(list(pixel_batches(processor, imgs.__getitem__, len(imgs), batch_size=4, workers=2)))
    expected = torch.cat([processor(images=[im], return_tensors="pt")["pixel_values"] for im in imgs])
    assert torch.equal(got, expected)


def test_an_image_smaller_than_the_crop_and_other_settings_go_through_the_processor():
    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 24, "width": 24})  # pads
    imgs = images()
    got = torch.cat(list(pixel_batches(processor, imgs.__getitem__, len(imgs), batch_size=4)))
    assert torch.equal(got, torch.cat([processor(images=[im], return_tensors="pt")["pixel_values"] for im in imgs]))
    assert plan(CLIPImageProcessorPil(do_pad=True, pad_size={"height": 80, "width": 80})) is None
