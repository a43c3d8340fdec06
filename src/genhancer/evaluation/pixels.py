"""Image preprocessing for evaluation at the cost of decoding: the processor's exact pixels, made in bulk.

transformers' PIL image processor handles one image at a time in NumPy (float64 rescale, float32 normalise, per
image checks and layout moves), which costs as much as the vision tower of a small CLIP. Here only the geometry
stays per image (PIL's own resize, then a crop by slicing), and rescaling and normalisation become one table
look-up per pixel, per batch: a uint8 value has 256 possible results, each computed once with the processor's own
arithmetic, so the tensors are bit-identical. All of it runs in a thread ahead of the model (PIL releases the GIL
while it decodes and resizes, NumPy while it looks up).

Only the processors this reproduces take the fast path (:func:`plan`): resize to a shortest edge or to a fixed
size, an optional centre crop that needs no padding, rescale and normalise. Anything else, and any image whose fast
pixels differ from the processor's on the first image of a run (checked every run), go through the processor.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Plan:
    """What the processor does, in the terms the fast path reproduces."""

    shortest_edge: int | None  # resize so the short side is this (aspect kept), or
    size: tuple[int, int] | None  # resize to (height, width)
    crop: tuple[int, int] | None  # centre crop (height, width)
    resample: int
    rescale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def geometry(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> (H, W, 3) uint8, resized and cropped as the processor does."""
        if self.shortest_edge is not None:
            w, h = image.size
            short, long = min(w, h), max(w, h)
            new_long = int(self.shortest_edge * long / short)
            size = (new_long, self.shortest_edge) if h <= w else (self.shortest_edge, new_long)  # (width, height)
        else:
            size = self.size[::-1] if self.size is not None else image.size
        if size != image.size:  # PIL's resize to the image's own size is a copy: skipped, same pixels
            image = image.resize(size, resample=self.resample)
        w, h = image.size
        pixels = np.frombuffer(image.tobytes(), np.uint8).reshape(h, w, 3)  # what np.array(image) does, minus a copy
        if self.crop is not None:
            ch, cw = self.crop
            top, left = (h - ch) // 2, (w - cw) // 2
            if top < 0 or left < 0:
                raise ValueError("image smaller than the crop: the processor would pad it")
            pixels = pixels[top : top + ch, left : left + cw]
        return pixels  # read-only: np.stack or the look-up copies it

    def normalise(self, batch: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 pixel values: one table look-up per pixel."""
        x = batch.transpose(0, 3, 1, 2)  # (N, 3, H, W) view, values 0..255
        lut = self.table().numpy()  # (3, 256)
        # NumPy's take indexes by the uint8 values directly (torch would want them as int64 first: 10x slower)
        return torch.from_numpy(np.stack([lut[c].take(x[:, c]) for c in range(3)], axis=1))

    @functools.cache
    def table(self) -> torch.Tensor:
        """(3, 256) float32: every uint8 value of every channel through the processor's arithmetic (uint8 ->
        float64 x factor -> float32, then (x - mean) / std in float32), so a look-up gives its exact result."""
        x = torch.arange(256, dtype=torch.float64)
        x = (x * self.rescale if self.rescale is not None else x).float().expand(3, -1)  # (3, 256)
        if self.mean is not None:
            x = (x - torch.tensor(self.mean, dtype=torch.float32)[:, None]) / torch.tensor(self.std,
                                                                                       dtype=torch.float32)[:, None]
        return x.contiguous()


def plan(processor) -> Plan | None:
    """The fast path's plan of ``processor``, or None when it cannot reproduce it."""
    if type(processor).__name__ not in ("CLIPImageProcessorPil", "SiglipImageProcessorPil", "CLIPImageProcessor",
                                        "SiglipImageProcessor") or getattr(processor, "do_pad", None):
        return None
    shortest, fixed = None, None
    if processor.do_resize:
        size = processor.size
        if size.get("longest_edge") or size.get("max_height") or size.get("max_width"):
            return None  # aspect-bounded resizes: not reproduced
        shortest = size.get("shortest_edge")
        fixed = (size["height"], size["width"]) if size.get("height") and size.get("width") else None
        if shortest is None and fixed is None:
            return None
    crop = processor.crop_size if getattr(processor, "do_center_crop", False) else None
    normalize = processor.do_normalize
    return Plan(shortest_edge=shortest, size=None if shortest is not None else fixed,
                crop=(crop["height"], crop["width"]) if crop is not None else None,
                resample=int(processor.resample),
                rescale=processor.rescale_factor if processor.do_rescale else None,
                mean=tuple(processor.image_mean) if normalize else None,
                std=tuple(processor.image_std) if normalize else None)


@contextlib.contextmanager
def worker_thread() -> Iterator[ThreadPoolExecutor]:
    """One background thread for work ahead of the model. When the block exits early (an error in the caller or in
    a task), the work still queued is cancelled instead of run; the task under way finishes first."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="genhancer-prepare")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def pixel_batches(processor, load: Callable[[int], Image.Image], count: int, batch_size: int,
                  pool: Executor) -> Iterator[torch.Tensor]:
    """(N, 3, H, W) pixel values of images ``load(0..count-1)``, ``batch_size`` at a time, identical to
    ``processor(images=...)``'s.

    Every batch (decoding, geometry, normalisation) is submitted to ``pool`` before this returns, so the pool works
    ahead of the caller from now on, and the caller may queue more work behind it. One thread is what a second core
    can give: the towers and PIL's Python parts share the GIL, and ``images.decode_image`` sets a local warnings
    filter (``warnings.catch_warnings``), which is not safe to enter from several threads at once.
    """
    p = plan(processor)
    if p is not None and count:
        image = load(0)
        try:
            first = p.normalise(p.geometry(image)[None])
        except ValueError:
            first = None
        if first is None or not torch.equal(first, processor(images=[image], return_tensors="pt")["pixel_values"]):
            p = None  # a processor setting this module does not reproduce: the processor's own path

    def prepare(i: int):  # (H, W, 3) uint8, or the processor's (3, H, W) for an image the fast path cannot take
        image = load(i)
        try:
            return p.geometry(image)
        except ValueError:
            return processor(images=[image], return_tensors="pt")["pixel_values"][0]

    def batch(start: int, stop: int) -> torch.Tensor:
        if p is None:
            return processor(images=[load(i) for i in range(start, stop)], return_tensors="pt")["pixel_values"]
        items = [prepare(i) for i in range(start, stop)]
        if all(isinstance(x, np.ndarray) for x in items):
            return p.normalise(np.stack(items))
        return torch.cat([p.normalise(x[None]) if isinstance(x, np.ndarray) else x[None] for x in items])

    futures = [pool.submit(batch, start, min(count, start + batch_size)) for start in range(0, count, batch_size)]
    return (future.result() for future in futures)
