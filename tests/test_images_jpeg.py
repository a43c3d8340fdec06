"""The direct JPEG path of ``decode_image``: the pixels and errors of ``Image.open``, or it stands aside.

``decode_image`` decodes a JPEG whose header holds only tables, a JFIF segment, comments and one 8-bit frame of 1
or 3 components straight through PIL's decoder (``images._plain_jpeg``); anything else goes through ``Image.open``.
Every case here is compared with the ``Image.open`` path run on its own (the direct path turned off).
"""

import io
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from genhancer import images
from genhancer.images import BadSample, decode_image


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def through_image_open(data: bytes):
    """``decode_image`` with the direct path off: the RGB pixels, or the BadSample reason."""
    with mock.patch.object(images, "_plain_jpeg", return_value=None):
        return outcome(data)


def outcome(data: bytes):
    try:
        img = decode_image(data)
    except BadSample as e:
        return e.reason
    assert img.mode == "RGB"
    return np.asarray(img).tobytes(), img.size


def with_segment(data: bytes, marker: int, body: bytes) -> bytes:
    """``data`` with one more segment right after SOI."""
    return data[:2] + bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body + data[2:]


def without_jfif(data: bytes) -> bytes:
    assert data[2:4] == b"\xff\xe0"
    return data[:2] + data[4 + int.from_bytes(data[4:6], "big"):]


ICC = b"\0" * 128  # a stand-in profile: PIL stores it, never applies it
EXIF = Image.Exif()
EXIF[0x0112] = 6
# name -> (JPEG bytes, whether the direct path takes it)
CASES = {
    "default 64x64": (jpeg(noise(64, 64)), True),
    "1x1": (jpeg(noise(1, 1)), True),
    "odd size 301x17": (jpeg(noise(301, 17)), True),
    "quality 5": (jpeg(noise(40, 30), quality=5), True),
    "quality 100, 4:4:4": (jpeg(noise(40, 30), quality=100, subsampling=0), True),
    "4:2:2": (jpeg(noise(40, 30), subsampling=1), True),
    "progressive": (jpeg(noise(48, 40), progressive=True), True),
    "optimised tables": (jpeg(noise(48, 40), optimize=True), True),
    "restart markers": (jpeg(noise(48, 40), restart_marker_blocks=2), True),
    "greyscale": (jpeg(noise(33, 20, "L")), True),
    "comment": (jpeg(noise(20, 20), comment=b"made here"), True),
    "trailing bytes": (jpeg(noise(20, 20)) + b"\0" * 50 + b"trailer", True),
    "no JFIF segment": (without_jfif(jpeg(noise(20, 20))), True),
    "RGB, not YCbCr (Adobe segment)": (jpeg(noise(20, 20), keep_rgb=True), False),
    "exif orientation": (jpeg(noise(20, 10), exif=EXIF.tobytes()), False),
    "icc profile": (jpeg(noise(20, 10), icc_profile=ICC), False),
    "cmyk": (jpeg(Image.new("CMYK", (8, 8), (255, 0, 0, 0))), False),
    "adobe segment": (with_segment(jpeg(noise(16, 16)), 0xEE, b"Adobe\0d\0\0\0\0\1"), False),
    "fill bytes": (jpeg(noise(16, 16))[:2] + b"\xff" + jpeg(noise(16, 16))[2:], False),
    # a table of 32 values: PIL's parser rejects it, and so does libjpeg
    "short quantisation table": (with_segment(jpeg(noise(16, 16)), 0xDB, bytes([1, *range(1, 33)])), False),
    "short JFIF": (with_segment(without_jfif(jpeg(noise(16, 16))), 0xE0, b"JFIF\0"), False),
    "truncated scan": (jpeg(noise(64, 64))[:-200], False),
    "truncated header": (jpeg(noise(64, 64))[:100], False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_direct_path_gives_image_opens_pixels_or_stands_aside(name):
    data, direct = CASES[name]
    assert (images._plain_jpeg(data, 10**9) is not None) == direct
    assert outcome(data) == through_image_open(data)


def test_the_limits_are_image_opens():
    data = jpeg(noise(20, 10))
    with pytest.raises(BadSample, match="too-large"):
        decode_image(data, max_pixels=199)
    assert decode_image(data, max_pixels=200).size == (20, 10)
    with mock.patch.object(Image, "MAX_IMAGE_PIXELS", 99):  # over twice PIL's own limit: its error, not a decode
        assert images._plain_jpeg(data, 10**9) is None
        assert outcome(data) == through_image_open(data) == "too-large"


JPEGS = [data for data, direct in CASES.values() if direct]


@st.composite
def damaged_jpeg(draw):
    """A JPEG the direct path takes, cut short, bit-flipped or overwritten, header included."""
    data = bytearray(draw(st.sampled_from(JPEGS)))
    kind = draw(st.sampled_from(["cut", "flip", "splice"]))
    if kind == "cut":
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "flip":
        for pos in draw(st.lists(st.integers(0, min(len(data), 700) - 1), min_size=1, max_size=6)):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    start, junk = draw(st.integers(0, min(len(data), 700) - 1)), draw(st.binary(min_size=1, max_size=32))
    return bytes(data[:start] + junk + data[start + len(junk):])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_jpeg())
def test_damaged_jpegs_decode_or_fail_as_through_image_open(data):
    assert outcome(data) == through_image_open(data)
