"""Robust decoding: odd but valid images decode to the right pixels, bad bytes are skipped and counted by reason."""

import collections
import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from genhancer.config import ConfigError, DataConfig
from genhancer.data import ImageFolder, ShardSource, SyntheticImages, build_loader
from genhancer.images import BadSample, decode_image, random_resized_crop
from genhancer.seeding import generator


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def noise(h=16, w=16, seed=0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def palette_with_transparency() -> bytes:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 1)
    return encode(img, "PNG", transparency=0)  # index 0 (red) is fully transparent


def exif_rotated() -> bytes:
    img = Image.new("RGB", (8, 4), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 4, 4))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def garbled_jpeg() -> bytes:
    data = encode(noise(32, 32), "JPEG")
    return data[:200] + np.random.RandomState(2).bytes(200) + data[400:]  # junk across the headers


BOMB = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)) \
    + png_chunk(b"IEND", b"")

# name -> (bytes, reason if it must be skipped else None)
GOOD = {
    "gray16.png": encode(Image.fromarray(np.full((4, 4), 65535, np.uint16)), "PNG"),
    "gray16be.tif": encode(Image.fromarray(np.full((4, 4), 257 * 100, np.dtype(">u2"))), "TIFF"),
    "cmyk.jpg": encode(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", quality=100),
    "palette_alpha.png": palette_with_transparency(),
    "la.png": encode(Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA"), "PNG"),
    "rgba.png": encode(Image.new("RGBA", (3, 3), (0, 0, 255, 0)), "PNG"),
    "onebit.png": encode(Image.new("1", (6, 6), 1), "PNG"),
    "tiny.png": encode(Image.new("RGB", (5, 5), (10, 20, 30)), "PNG"),
    "lossless.webp": encode(Image.new("RGB", (7, 9), (200, 100, 50)), "WEBP", lossless=True),
    "rotated.jpg": exif_rotated(),
    "anim.gif": encode(Image.new("RGB", (6, 6), (255, 0, 0)), "GIF"),
    "plain.bmp": encode(Image.new("RGB", (6, 6), (0, 255, 0)), "BMP"),
}
PNG = encode(noise(), "PNG")
BAD = {
    "corrupt.jpg": (b"\xff\xd8\xff\xe0" + np.random.RandomState(1).bytes(400), "truncated"),
    "garbled.jpg": (garbled_jpeg(), "corrupt"),
    "truncated.png": (PNG[:len(PNG) // 2], "truncated"),
    "empty.png": (b"", "empty-file"),
    "notes.jpg": (b"shopping list: eggs, milk\n", "not-an-image"),
    "page.jpeg": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not-an-image"),
    "bomb.png": (BOMB, "too-large"),
    "float.tif": (encode(Image.new("F", (4, 4), 0.5), "TIFF"), "unsupported-mode"),  # floats of unknown range
}


def rgb(name: str) -> np.ndarray:
    img = decode_image(GOOD[name])
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def test_odd_but_valid_images_decode_to_the_right_pixels():
    assert (rgb("gray16.png") == 255).all()  # 16-bit white stays white (not clipped to 1/257)
    assert (rgb("gray16be.tif") == 100).all()
    assert np.abs(rgb("cmyk.jpg") - [0, 255, 255]).max() <= 2
    pal = rgb("palette_alpha.png")
    assert (pal[0, 0] == [0, 0, 255]).all() and (pal[1:] == 255).all()  # transparent red -> white
    la = rgb("la.png")
    assert (la[0, 0] == 255).all() and (la[0, 1] == 0).all()
    assert (rgb("rgba.png") == 255).all()
    assert (rgb("onebit.png") == 255).all()
    assert rgb("tiny.png").shape == (5, 5, 3) and (rgb("tiny.png") == [10, 20, 30]).all()
    assert rgb("lossless.webp").shape == (9, 7, 3) and (rgb("lossless.webp") == [200, 100, 50]).all()
    rot = rgb("rotated.jpg")  # 8x4 with a white left half, turned upright: 4 wide, 8 tall, white top half
    assert rot.shape == (8, 4, 3) and rot[:3].min() > 200 and rot[5:].max() < 50
    assert (rgb("anim.gif") == [255, 0, 0]).all() and (rgb("plain.bmp") == [0, 255, 0]).all()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_bytes_raise_bad_sample_with_a_reason(name):
    data, reason = BAD[name]
    with pytest.raises(BadSample) as e:
        decode_image(data)
    assert e.value.reason == reason


def test_max_pixels_is_checked_from_the_header_without_global_side_effects():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadSample, match="too-large"):
        decode_image(encode(noise(), "PNG"), max_pixels=100)
    assert Image.MAX_IMAGE_PIXELS == before


def test_folder_of_bad_files_is_loaded_and_counted(tmp_path):
    for name, data in GOOD.items():
        (tmp_path / name).write_bytes(data)
    for name, (data, _) in BAD.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "readme.txt").write_text("ignored: not an image extension")
    n = len(GOOD) + len(BAD)
    cfg = DataConfig(source="folder", path=str(tmp_path), num_workers=0)
    loader = build_loader(cfg, 8, seed=0, batch_size=n)
    batch = next(iter(loader))
    assert batch["pixels"].shape == (len(GOOD), 3, 8, 8)
    names = [ImageFolder(tmp_path).load(i)[0] for i in range(n)]
    order = torch.randperm(n, generator=generator(0, 0)).tolist()  # the documented epoch order
    assert [names[i] for i in batch["index"].tolist()] == [names[order[s]] for s in batch["slot"].tolist()]
    assert sorted(names[order[s]] for s in set(range(n)) - set(batch["slot"].tolist())) == sorted(BAD)
    assert collections.Counter(batch["skipped"]) == collections.Counter(r for _, r in BAD.values())
    assert loader.stats.seen == n and loader.stats.skipped == len(BAD)
    assert loader.stats.by_reason == dict(collections.Counter(r for _, r in BAD.values()))
    loader.check(0.5, min_seen=1)
    # Bad-sample markers survive the trip through worker processes unchanged.
    par = next(iter(build_loader(DataConfig(source="folder", path=str(tmp_path), num_workers=2), 8, seed=0,
                                 batch_size=n)))
    assert torch.equal(par["pixels"], batch["pixels"]) and par["skipped"] == batch["skipped"]
    with pytest.raises(ConfigError) as e:
        loader.check(0.05, min_seen=1)
    msg = str(e.value)
    assert "\n" not in msg and f"skipped {len(BAD)} of {n} samples" in msg and "data.max_skip_fraction" in msg


def test_truncated_shard_keeps_its_complete_samples(tmp_path):
    synth = SyntheticImages(10, size=20)
    for s in range(2):
        with tarfile.open(tmp_path / f"{s}.tar", "w") as tar:
            for j in range(5):
                for ext, data in (("jpg", encode(synth.load(5 * s + j)[1], "JPEG")), ("txt", b"caption")):
                    info = tarfile.TarInfo(f"{s}{j:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    # Cut shard 0 inside the image of its 4th sample: samples 0..2 are complete.
    raw = (tmp_path / "0.tar").read_bytes()
    (tmp_path / "0.tar").write_bytes(raw[:raw.index(b"0003.jpg") + 512 + 100])
    entries = list(ShardSource(str(tmp_path / "0.tar")))
    assert [e.offset for e in entries] == [0, 1, 2, 3] and entries[-1].skip == "truncated-shard"
    cfg = DataConfig(source="webdataset", path=str(tmp_path), num_workers=0)
    loader = build_loader(cfg, 8, seed=0, batch_size=100)
    batch = next(iter(loader))
    assert len(batch["index"]) == 8 and batch["skipped"] == ["truncated-shard"]
    assert sorted(batch["index"].tolist()) == [0, 1, 2] + [(1 << 32) + j for j in range(5)]


# ------------------------------------------------------------------------------------------------ fuzzing

SAMPLES = [encode(noise(6, 5, seed=i), fmt, **kw) for i, (fmt, kw) in enumerate(
    [("PNG", {}), ("JPEG", {}), ("GIF", {}), ("WEBP", {}), ("BMP", {}), ("TIFF", {}), ("JPEG", {"progressive": True}),
     ("PNG", {"optimize": True}), ("WEBP", {"lossless": True})])]
SAMPLES += [encode(Image.new(mode, (5, 4)), "PNG") for mode in ("L", "LA", "P", "RGBA", "1", "I;16")]
MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"GIF89a", b"GIF87a",
          b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"RIFF\x10\x00\x00\x00WEBPVP8L", b"BM", b"II*\x00", b"MM\x00*",
          b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"]


@st.composite
def truncated(draw):
    data = draw(st.sampled_from(SAMPLES))
    return data[:draw(st.integers(0, len(data)))]


@st.composite
def bit_flipped(draw):
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for pos in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
        data[pos] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@st.composite
def spliced(draw):
    """A real image with a run of its bytes overwritten (damaged sector, bad download)."""
    data = draw(st.sampled_from(SAMPLES))
    start = draw(st.integers(0, len(data) - 1))
    junk = draw(st.binary(min_size=1, max_size=64))
    return data[:start] + junk + data[start + len(junk):]


MALFORMED = st.one_of(st.binary(max_size=256), truncated(), bit_flipped(), spliced(),
                      st.builds(lambda m, junk: m + junk, st.sampled_from(MAGICS), st.binary(max_size=256)))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MALFORMED)
def test_any_bytes_give_an_rgb_image_or_bad_sample(data):
    try:
        img = decode_image(data)
    except BadSample as e:
        assert isinstance(e.reason, str) and e.reason
        return
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.width >= 1 and img.height >= 1
    crop = random_resized_crop(img, 4, generator=torch.Generator().manual_seed(0))
    assert crop.shape == (3, 4, 4) and 0 <= crop.min() and crop.max() <= 1
