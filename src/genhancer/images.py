"""Images from files: the one list of image extensions, the one robust decoder, and deterministic crops.

Training data (``data.py``), VQ training (``vq.folder_images``), reconstruction previews and evaluation all read
images through :func:`decode_image`. A plain JPEG (only tables, JFIF and comments before one 8-bit frame) goes
straight to PIL's decoder, without PIL's header parser in Python; everything else through ``Image.open``.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
# Register the decoders of _FORMATS (Image.open(formats=...) only sees plugins imported so far; JPEG also opens MPO).
from PIL import (BmpImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin,  # noqa: F401
                 WebPImagePlugin)

from .errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # webdataset keys of an image (img2dataset writes one)
# Only these decoders are tried: fewer surprises (e.g. EPS would run Ghostscript) and faster rejection of junk.
_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_MAGICS = (b"\xff\xd8", b"\x89PNG", b"RIFF", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is a short slug such as ``"corrupt"`` or ``"truncated"``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------- decoding


def decode_image(data: bytes, max_pixels: int = 89_478_485) -> Image.Image:
    """Decode image bytes to an RGB image, or raise :class:`BadSample` (and nothing else) for any input.

    Transparency is composited on white, 16-bit greyscale is scaled to 8 bits (65535 -> 255), EXIF orientation is
    applied. Images with more than ``max_pixels`` pixels are rejected from the header, before decoding (PIL's own
    hard limit, twice ``Image.MAX_IMAGE_PIXELS``, also applies). Truncated files are rejected, never half-decoded,
    as long as ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` keeps its default (False); this module never changes it.
    """
    if not data:
        raise BadSample("empty-file")
    plain = _plain_jpeg(data, max_pixels)
    if plain is not None:
        return _to_rgb(plain)
    try:
        # Local warning filter: PIL's DecompressionBombWarning / EXIF warnings must not leak into the run's log.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=_FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise BadSample("too-large")
            img.load()
            _exif_transpose(img)
            return _to_rgb(img)
    except BadSample:
        raise
    except Image.DecompressionBombError:
        raise BadSample("too-large") from None
    except UnidentifiedImageError:
        # Image magic but unreadable header: a damaged image rather than some other kind of file.
        raise BadSample("corrupt" if bytes(data[:4]).startswith(_MAGICS) else "not-an-image") from None
    except EOFError:
        raise BadSample("truncated") from None
    except OSError as e:
        raise BadSample("truncated" if "truncated" in str(e).lower() else "corrupt") from None
    except Exception:  # any decoder failure (SyntaxError, ValueError, struct.error, MemoryError, ...) on bad bytes
        raise BadSample("corrupt") from None


# JPEG segments before the scan that PIL's parser only reads or skips: Huffman and quantisation tables, restart
# interval, comment, APP0 (JFIF); and the frames it reads a size from: baseline, extended, progressive
_PLAIN_SEGMENTS = {0xC4, 0xDB, 0xDD, 0xFE, 0xE0}
_PLAIN_FRAMES = {0xC0, 0xC1, 0xC2}
_LAYER_MODES = {1: "L", 3: "RGB"}


def _plain_jpeg(data: bytes, max_pixels: int) -> Image.Image | None:
    """A JPEG without anything for PIL's parser to act on, decoded by PIL's decoder directly; else None.

    ``Image.open`` parses every segment of a JPEG's header in Python, only to hand the whole file to libjpeg with
    a mode chosen from the number of components (a third of the time of a small image, all of it holding the GIL
    that a model in another thread waits on). Here one pass over the segment lengths finds the frame, and
    ``Image.frombytes`` runs the same decoder with the same arguments: the same pixels. Anything else returns None
    and goes through ``Image.open``, which then decodes it or names what is wrong: an APP segment other than JFIF
    (EXIF orientation, ICC, Adobe, MPO), CMYK or 12-bit frames, fill bytes, a JFIF segment too short for PIL, a
    size over the limits, any decoder error (libjpeg checks the segments PIL's parser checks, and more).
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, size, mode = 2, None, None
    while True:
        if pos + 4 > len(data) or data[pos] != 0xFF:
            return None
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > len(data):
            return None
        if marker == 0xDA:  # start of scan: the header is over
            break
        body = data[pos + 4 : end]
        if marker in _PLAIN_FRAMES:
            mode = _LAYER_MODES.get(body[5]) if len(body) >= 6 else None
            if size is not None or mode is None or body[0] != 8:  # libjpeg checks the length against the layers
                return None
            size = (int.from_bytes(body[3:5], "big"), int.from_bytes(body[1:3], "big"))  # (width, height)
        elif marker not in _PLAIN_SEGMENTS:
            return None
        elif marker == 0xE0 and body[:4] == b"JFIF" and len(body) < 7:
            return None  # PIL reads the JFIF version at bytes 5-6
        pos = end
    if size is None or not size[0] or not size[1]:
        return None
    pixels = size[0] * size[1]
    if pixels > max_pixels or (Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS):
        return None  # Image.open's and decode_image's checks say what is wrong
    try:
        return Image.frombytes(mode, size, data, "jpeg", mode, "")  # what Image.open's tile runs: (rawmode, "")
    except Exception:  # truncated or damaged: Image.open names it
        return None


def _exif_transpose(img: Image.Image) -> None:
    """Apply the EXIF orientation in place (the image is ours, freshly decoded: no copy of it is made). A damaged
    EXIF block should not cost an otherwise fine image: the image is then kept as stored."""
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "I" or img.mode.startswith("I;16"):
        # 16-bit greyscale (PNG / TIFF): PIL's convert("L") clips instead of scaling, so scale 0..65535 -> 0..255.
        values = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "F":  # floats of unknown range
        raise BadSample("unsupported-mode")
    if img.mode == "RGB" and getattr(img, "n_frames", 1) == 1:
        return img  # already what we want; convert would only copy it
    try:
        return img.convert("RGB")
    except ValueError:
        raise BadSample("unsupported-mode") from None


# ----------------------------------------------------------------------------------------------- crops


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float] = (0.9, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``(3, size, size)`` float32 crop in [0, 1] resized with bicubic filtering.

    With a generator: torchvision's ``RandomResizedCrop`` parameters (10 tries of area share ~ U(scale) and
    log-aspect ~ U(log ratio), then a central crop clamped to ``ratio``), all drawn from ``generator``. Without one:
    the central square of the full image (side = shorter side). Images smaller than ``size`` are upscaled.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    if generator is None:
        side = min(width, height)
        top, left, h, w = (height - side) // 2, (width - side) // 2, side, side
    else:
        top, left, h, w = _crop_params(width, height, scale, ratio, generator)
    # Crop, then resize (as torchvision does): pixels outside the crop never bleed into its border.
    out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def _crop_params(width: int, height: int, scale, ratio, g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) exactly as torchvision's ``RandomResizedCrop.get_params`` draws them."""
    area = height * width
    log_lo, log_hi = torch.log(torch.tensor(ratio)).tolist()
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        # exp in float32 on a tensor, as torchvision does, so that w and h round identically.
        aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ----------------------------------------------------------------------------------------------- folders


def image_files(root: Path, recursive: bool = True) -> list[Path]:
    """The image files (by :data:`IMAGE_EXTENSIONS`) under ``root``, sorted by their path relative to it."""
    found = root.rglob("*") if recursive else root.iterdir()
    return sorted((p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                  key=lambda p: p.relative_to(root).as_posix())


def folder_crops(root: str | Path, size: int, limit: int | None = None) -> torch.Tensor:
    """``(N, 3, size, size)`` in [0, 1]: the central square crops of the first ``limit`` (default: all) readable
    images under ``root``, recursively, in path order; unreadable files are skipped."""
    files = image_files(Path(root)) if Path(root).is_dir() else []
    if not files:
        raise ConfigError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under '{root}': point "
                          "at a folder of images")
    crops = []
    for f in files:
        if limit is not None and len(crops) == limit:
            break
        try:
            crops.append(random_resized_crop(decode_image(f.read_bytes()), size))
        except BadSample:
            continue
    if not crops:
        raise ConfigError(f"none of the {len(files)} image files under '{root}' could be decoded")
    return torch.stack(crops)
