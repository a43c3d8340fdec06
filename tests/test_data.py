"""Crops, sources and the loader's determinism: workers, world size, resume."""

import io
import itertools
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from genhancer.config import ConfigError, DataConfig
from genhancer.data import ImageFolder, ShardSource, SkipStats, SyntheticImages, build_loader
from genhancer.images import _crop_params, random_resized_crop

SIZE = 16


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def write_shards(root, n_shards, per_shard, size=24):
    """``n_shards`` img2dataset-style tars of ``per_shard`` PNG + caption samples; returns their paths."""
    synth = SyntheticImages(n_shards * per_shard, size=size, seed=7)
    paths = []
    for s in range(n_shards):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                for ext, data in (("png", png_bytes(synth.load(s * per_shard + j)[1])), ("txt", b"a caption")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ crops


def test_crop_shape_range_and_determinism():
    img = SyntheticImages(1, size=40).load(0)[1].resize((40, 30))
    a = random_resized_crop(img, SIZE, generator=torch.Generator().manual_seed(1))
    b = random_resized_crop(img, SIZE, generator=torch.Generator().manual_seed(1))
    c = random_resized_crop(img, SIZE, scale=(0.2, 0.5), generator=torch.Generator().manual_seed(2))
    assert a.shape == (3, SIZE, SIZE) and a.dtype == torch.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)
    # No generator: the central 30x30 square, resized.
    centre = random_resized_crop(img, SIZE)
    expect = np.array(img.crop((5, 0, 35, 30)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)) / 255.0
    assert torch.allclose(centre, torch.from_numpy(expect).permute(2, 0, 1).float(), atol=1e-6)


def test_tiny_image_is_upscaled():
    img = Image.new("RGB", (5, 5), (255, 0, 0))
    out = random_resized_crop(img, SIZE, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, SIZE, SIZE)
    assert torch.allclose(out[0], torch.ones(SIZE, SIZE)) and out[1:].abs().max() < 1e-6


def test_crop_params_fall_back_to_clamped_central_crop():
    # A 100x10 strip: no crop of >= 90% area with aspect in [3/4, 4/3] fits, so all 10 tries fail.
    top, left, h, w = _crop_params(100, 10, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    assert (top, left, h, w) == (0, (100 - 13) // 2, 10, 13)
    for seed in range(20):
        top, left, h, w = _crop_params(50, 40, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))
        assert 0.9 * 2000 - 60 <= h * w <= 2000 and top + h <= 40 and left + w <= 50


# ------------------------------------------------------------------------------------------------ sources


def test_image_folder_sorted_recursive_and_filtered(tmp_path):
    (tmp_path / "b").mkdir()
    img = png_bytes(Image.new("RGB", (8, 8)))
    for name in ("b/z.PNG", "a.jpg", "b/a.webp", "notes.txt", "c.Tiff"):
        (tmp_path / name).write_bytes(img)
    folder = ImageFolder(tmp_path)
    assert len(folder) == 4
    assert [folder.load(i)[0] for i in range(4)] == ["a.jpg", "b/a.webp", "b/z.PNG", "c.Tiff"]
    assert folder.load(0)[1] == img


def test_empty_or_missing_folder_is_a_config_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images")
    with pytest.raises(ConfigError, match="no images found under"):
        ImageFolder(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        ImageFolder(tmp_path / "nope")


def test_synthetic_images_are_deterministic_and_varied():
    a, b = SyntheticImages(3, size=32), SyntheticImages(3, size=32)
    x0, x1 = np.array(a.load(0)[1]), np.array(a.load(1)[1])
    assert x0.shape == (32, 32, 3) and np.array_equal(x0, np.array(b.load(0)[1]))
    assert not np.array_equal(x0, x1) and x0.std() > 10


def test_missing_shards_are_a_config_error(tmp_path):
    write_shards(tmp_path, 2, 1)
    assert len(ShardSource(str(tmp_path / "{00000..00001}.tar"))) == 2
    assert len(ShardSource(tmp_path)) == 2
    with pytest.raises(ConfigError, match="1 of 3 shards not found"):
        ShardSource(str(tmp_path / "{00000..00002}.tar"))


def test_skip_stats_summary_and_check():
    m = SkipStats()
    m.add(500, ["corrupt", "empty-file", "corrupt"])
    m.add(500, [])
    assert m.summary() == "skipped 3 of 1000 samples (0.3%): corrupt 2, empty-file 1"
    m.check(0.01)
    m.check(0.002, min_seen=2000)  # 3 of 1000 is past 0.2%, but within the 4 allowed while under 2000 seen
    with pytest.raises(ConfigError, match=r"skipped 3 of 1000 samples .*data.max_skip_fraction=0.001") as e:
        m.check(0.001)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ loader


def synthetic_cfg(workers=0, n=24):
    return DataConfig(source="synthetic", synthetic_size=n, num_workers=workers, prefetch_factor=1)


def test_batches_do_not_depend_on_num_workers():
    ref = take(build_loader(synthetic_cfg(0), SIZE, seed=3, batch_size=4), 4)
    par = take(build_loader(synthetic_cfg(2), SIZE, seed=3, batch_size=4), 4)
    for a, b in zip(ref, par):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["pixels"], b["pixels"])
    assert ref[0]["pixels"].shape == (4, 3, SIZE, SIZE) and ref[0]["skipped"] == []


def test_ranks_split_the_global_batch_of_one_process():
    one = take(build_loader(synthetic_cfg(), SIZE, seed=5, batch_size=6), 5)  # crosses the epoch (4 batches)
    ranks = [take(build_loader(synthetic_cfg(), SIZE, seed=5, rank=r, world=2, batch_size=3), 5) for r in (0, 1)]
    for k in range(5):
        index = torch.cat([ranks[0][k]["index"], ranks[1][k]["index"]])
        pixels = torch.cat([ranks[0][k]["pixels"], ranks[1][k]["pixels"]])
        assert torch.equal(index, one[k]["index"]) and torch.equal(pixels, one[k]["pixels"])


def test_resume_gives_exactly_the_remaining_batches():
    loader = build_loader(synthetic_cfg(), SIZE, seed=1, batch_size=5)  # 24 // 5 = 4 batches per epoch
    assert loader.epoch_size == 4
    full = take(loader, 7)
    assert loader.position == {"epoch": 1, "batch": 3} and loader.stats.seen == 35
    for position in ({"epoch": 0, "batch": 2}, {"epoch": 0, "batch": 4}):  # mid-epoch, and at an epoch's end
        resumed = build_loader(synthetic_cfg(), SIZE, seed=1, batch_size=5, epoch=position["epoch"],
                               start_batch=position["batch"])
        done = 2 if position["batch"] == 2 else 4
        for want, got in zip(full[done:], take(resumed, 7 - done)):
            assert torch.equal(want["index"], got["index"]) and torch.equal(want["pixels"], got["pixels"])
    # A new epoch reshuffles.
    assert not torch.equal(torch.cat([b["index"] for b in full[:3]]), torch.cat([b["index"] for b in full[4:7]]))


def test_dataset_smaller_than_a_global_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        build_loader(synthetic_cfg(n=5), SIZE, seed=0, batch_size=3, world=2)


def test_cache_source_is_stacked_without_decoding():
    cache = [{"latents": torch.full((2, 4), float(i)), "pixels": torch.full((3, SIZE, SIZE), i / 10)}
             for i in range(10)]
    batches = take(build_loader(synthetic_cfg(), SIZE, seed=0, batch_size=4, source=cache), 3)
    b = batches[0]
    assert b["latents"].shape == (4, 2, 4) and b["pixels"].shape == (4, 3, SIZE, SIZE)
    assert torch.equal(b["latents"][:, 0, 0].long(), b["index"]) and b["skipped"] == []


def shard_loader(paths, workers=0, **kw):
    cfg = DataConfig(source="webdataset", num_workers=workers, prefetch_factor=1)
    return build_loader(cfg, SIZE, seed=2, source=ShardSource([str(p) for p in paths]), **kw)


def test_shards_workers_resume_and_ranks(tmp_path):
    paths = write_shards(tmp_path, 3, 5)
    ref = take(shard_loader(paths, batch_size=4), 6)  # 15 samples: batches of 4, 4, 4, 3, then the next epoch
    assert [len(b["index"]) for b in ref] == [4, 4, 4, 3, 4, 4]
    assert sorted(torch.cat([b["index"] for b in ref[:4]]).tolist()) == sorted(
        (s << 32) + j for s in range(3) for j in range(5))
    for other in (take(shard_loader(paths, workers=2, batch_size=4), 6),
                  [None] * 2 + take(shard_loader(paths, batch_size=4, start_batch=2), 4)):
        for want, got in zip(ref, other):
            if got is not None:
                assert torch.equal(want["index"], got["index"]) and torch.equal(want["pixels"], got["pixels"])
    # Two ranks read disjoint shards; together they cover the epoch.
    ranks = [take(shard_loader(paths, rank=r, world=2, batch_size=20), 1)[0]["index"] for r in (0, 1)]
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())
    assert len(ranks[0]) + len(ranks[1]) == 15
    # Fewer shards than ranks: every rank reads the shard and keeps every second sample.
    ranks = [take(shard_loader(paths[:1], rank=r, world=2, batch_size=20), 1)[0]["index"] for r in (0, 1)]
    assert sorted(ranks[0].tolist() + ranks[1].tolist()) == list(range(5)) and len(ranks[0]) == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_leaves_the_global_rng_alone(workers):
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    take(build_loader(synthetic_cfg(workers), SIZE, seed=0, batch_size=4), 7)  # crosses an epoch start
    assert torch.equal(torch.rand(3), want)
