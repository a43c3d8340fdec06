"""Training images: sources and deterministic, resumable batches (decoding and crops: ``images.py``).

Sources
    :class:`ImageFolder` (a directory tree of image files), :class:`SyntheticImages` (smooth random images for
    tests and benchmarks), :class:`ShardSource` (webdataset tar shards in img2dataset layout) and any map-style
    object with ``__len__`` / ``__getitem__(i) -> dict of tensors`` (a precomputed cache; batched by stacking).

Decoding
    ``images.decode_image`` turns any bytes into an RGB ``PIL.Image`` or raises ``BadSample`` with a short reason;
    the loader drops bad samples from their batch, lists the reasons in ``batch["skipped"]`` and counts them in
    :class:`SkipStats` so the trainer can stop when too many files are unreadable (``data.max_skip_fraction``).

Batches
    ``build_loader(...)`` returns an endless :class:`Loader` of micro-batches ``dict(pixels=(b, 3, S, S) float32 in
    [0, 1], index=(b,) long, slot=(b,) long, skipped=list[str], skipped_names=list[str])`` with ``b <= batch_size``:
    bad samples are dropped (b may be 0) and their reasons and file names listed; ``slot`` is each kept sample's
    position in the undropped micro-batch.

Determinism guarantees
    Map-style sources (folder, synthetic, cache): the global order of epoch ``e`` is ``randperm(N)`` seeded by
    (seed, e), cut into global micro-batches of ``batch_size * world`` samples (the last partial one is dropped);
    rank r takes positions ``[r * batch_size, (r + 1) * batch_size)`` of each. Every crop is drawn from a generator
    seeded by (seed, epoch, global index) only. Hence the batches are bit-identical for any ``num_workers``, the
    union over ranks of global micro-batch k is the same for any world size with the same global batch, and
    ``build_loader(..., epoch=e, start_batch=k)`` yields exactly the batches after ``position == {epoch: e, batch: k}``.

    Webdataset shards: the shard list is permuted per epoch by (seed, epoch); rank r reads shards ``r::world``
    (with fewer shards than ranks every rank reads all shards and keeps stream samples ``i % world == r``).
    This rank's raw stream is cut into micro-batches of ``batch_size`` consecutive samples; a crop's generator is
    seeded by (seed, epoch, shard index, offset in shard) and ``index`` is ``shard index * 2**32 + offset``.
    With ``num_workers = W > 0`` every worker reads this rank's whole stream (cheap: no decoding) but decodes only
    the micro-batches ``k % W == its id``; torch's DataLoader returns worker outputs round-robin, so the batches
    are the same, in the same order, for any W, and resuming skips ``start_batch * batch_size`` raw samples without
    decoding them. Ranks may hold different numbers of samples per epoch: the loader is endless, so a trainer
    should count steps, not epochs. A truncated shard contributes the complete samples before the break, then
    one stream slot marked ``"truncated-shard"`` (counted as one skipped sample).
"""

from __future__ import annotations

import itertools
import signal
import tarfile
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from genhancer.config import DataConfig
from genhancer.errors import ConfigError
from genhancer.images import (IMAGE_EXTENSIONS, SHARD_IMAGE_KEYS, BadSample, decode_image, image_files,
                              random_resized_crop)
from genhancer.seeding import generator


# ----------------------------------------------------------------------------------------------- sources


class ImageFolder:
    """Every image file under ``root`` (recursive, sorted by relative path); ``load(i) -> (key, bytes)``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"image folder '{self.root}' does not exist: set data.path to a directory of images")
        self.files = image_files(self.root)
        if not self.files:
            raise ConfigError(f"no images found under {self.root}: add {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} "
                              f"files or point data.path at the right directory")

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> tuple[str, bytes]:
        path = self.files[i]
        return path.relative_to(self.root).as_posix(), path.read_bytes()


class SyntheticImages:
    """``n`` smooth colourful RGB images of ``size`` x ``size``, a pure function of (seed, index).

    ``load(i) -> (key, PIL.Image)``: already decoded, the loader skips decoding for it.
    """

    def __init__(self, n: int, size: int = 256, seed: int = 0):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def load(self, i: int) -> tuple[str, Image.Image]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = generator("synthetic", self.seed, i)
        # Coarse colour field (large smooth blobs) blended with a finer one (texture for the crops to keep).
        coarse, fine = (torch.rand(k, k, 3, generator=g).mul(255).to(torch.uint8).numpy() for k in (4, 16))
        base = Image.fromarray(coarse).resize((self.size, self.size), Image.Resampling.BICUBIC)
        detail = Image.fromarray(fine).resize((self.size, self.size), Image.Resampling.BICUBIC)
        return f"synthetic/{i:08d}", Image.blend(base, detail, 0.3)


class RawSample(NamedTuple):
    """One entry of a shard stream: an image (``image`` bytes, or None when the sample has none) or, with
    ``skip`` set, a stream slot standing for an unreadable remainder of a shard."""

    shard: int
    offset: int
    key: str
    image: bytes | None
    skip: str | None = None


class ShardSource:
    """Webdataset tar shards (img2dataset layout: ``KEY.jpg`` + ``KEY.txt`` + ``KEY.json`` per sample).

    ``shards``: a brace pattern (``"data/{00000..00099}.tar"``), a directory (every ``*.tar`` below it, sorted) or a
    list of either. Iterating yields :class:`RawSample` s of all shards in order; ``samples(s)`` those of one shard.
    """

    def __init__(self, shards: str | Path | list):
        from braceexpand import braceexpand  # a webdataset dependency

        paths: list[str] = []
        for item in shards if isinstance(shards, (list, tuple)) else [shards]:
            item = str(item)
            if Path(item).is_dir():
                paths += sorted(str(p) for p in Path(item).rglob("*.tar"))
            else:
                paths += list(braceexpand(item))
        if not paths:
            raise ConfigError(f"no .tar shards found for data.path={shards}: give a directory or a brace pattern")
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise ConfigError(f"{len(missing)} of {len(paths)} shards not found (first: {missing[0]}): "
                              f"fix data.path or the shard range")
        self.shards = paths

    def __len__(self) -> int:
        return len(self.shards)

    def __iter__(self) -> Iterator[RawSample]:
        for s in range(len(self.shards)):
            yield from self.samples(s)

    def samples(self, shard: int) -> Iterator[RawSample]:
        """Samples of one shard in tar order; a read error ends the shard with one ``skip`` slot."""
        offset, key, image = 0, None, None
        try:
            # Stream mode ("r|"): one sequential pass, nothing buffered but the current sample's image bytes.
            with tarfile.open(self.shards[shard], "r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name_key, ext = _split_name(member.name)
                    if name_key != key:
                        if key is not None:
                            yield RawSample(shard, offset, key, image)
                            offset += 1
                        key, image = name_key, None
                    if image is None and ext.lower() in SHARD_IMAGE_KEYS:
                        image = tar.extractfile(member).read()
            if key is not None:
                yield RawSample(shard, offset, key, image)
        except (tarfile.TarError, EOFError, OSError, zlib.error):
            # The sample being read at the break is incomplete: it goes down with the rest of the shard.
            yield RawSample(shard, offset, key or "", None, "truncated-shard")


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (folder + "/" + stem if folder else stem), ext


# ----------------------------------------------------------------------------------------------- batching


@dataclass
class _Skipped:
    reason: str
    name: str = ""  # the file (or shard:key) it came from, for the run's log


def _collate(items: list, size: int) -> dict:
    """Stack the good items of one micro-batch; bad ones become reasons in ``skipped``.

    ``slot`` (b,) is each kept sample's position in the full micro-batch, so per-sample randomness drawn for the
    whole global batch can still be matched to its sample when some were dropped.
    """
    slots = [pos for pos, it in enumerate(items) if not isinstance(it, _Skipped)]
    good = [items[pos] for pos in slots]
    batch: dict = {}
    if good and isinstance(good[0][0], dict):  # cache entries: stack every tensor field
        for name in good[0][0]:
            batch[name] = torch.stack([x[name] for x, _ in good])
    else:
        batch["pixels"] = torch.stack([x for x, _ in good]) if good else torch.zeros(0, 3, size, size)
    batch["index"] = torch.tensor([i for _, i in good], dtype=torch.long)
    batch["slot"] = torch.tensor(slots, dtype=torch.long)
    batch["skipped"] = [it.reason for it in items if isinstance(it, _Skipped)]
    batch["skipped_names"] = [it.name for it in items if isinstance(it, _Skipped)]
    return batch


def _crop_sample(image, size: int, scale, generator: torch.Generator):
    """The (3, S, S) crop of bytes or a PIL image, or a :class:`_Skipped` for a bad sample."""
    try:
        img = image if isinstance(image, Image.Image) else decode_image(image)
    except BadSample as e:
        return _Skipped(e.reason)
    return random_resized_crop(img, size, scale, generator=generator)


class _MapItems(Dataset):
    """Map-style items addressed by (epoch, global index): crops of an image source, or a cache's tensor dicts."""

    def __init__(self, source, size: int, scale, seed: int):
        self.source, self.size, self.scale, self.seed = source, size, scale, seed
        self.images = hasattr(source, "load")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, task: tuple[int, int]):
        epoch, index = task
        if not self.images:
            return self.source[index], index
        files = getattr(self.source, "files", None)
        name = str(files[index]) if files is not None else str(index)
        try:
            _, payload = self.source.load(index)
        except OSError:  # file vanished or permission denied since listing
            return _Skipped("unreadable", name)
        out = _crop_sample(payload, self.size, self.scale, generator(self.seed, epoch, index))
        if isinstance(out, _Skipped):
            out.name = name
            return out
        return out, index


class _RankBatches:
    """Batch sampler: this rank's slice of each global micro-batch ``k in ks`` of epoch ``epoch``'s permutation,
    as lists of (epoch, global index) tasks for :class:`_MapItems`; built lazily (epochs may hold millions)."""

    def __init__(self, n: int, seed: int, epoch: int, rank: int, batch_size: int, global_batch: int, ks: range):
        self.order = torch.randperm(n, generator=generator(seed, epoch))
        self.epoch, self.ks = epoch, ks
        self.lo, self.batch_size, self.global_batch = rank * batch_size, batch_size, global_batch

    def __len__(self) -> int:
        return len(self.ks)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for k in self.ks:
            start = k * self.global_batch + self.lo
            yield [(self.epoch, i) for i in self.order[start:start + self.batch_size].tolist()]


class _ShardBatches(IterableDataset):
    """This rank's micro-batches of one epoch of shards, each a list of items for :func:`_collate`."""

    def __init__(self, source: ShardSource, size: int, scale, seed: int, epoch: int, rank: int, world: int,
                 batch_size: int, start_batch: int):
        self.source, self.size, self.scale, self.seed, self.epoch = source, size, scale, seed, epoch
        self.rank, self.world, self.batch_size, self.start_batch = rank, world, batch_size, start_batch

    def _stream(self) -> Iterator[RawSample]:
        n = len(self.source)
        order = torch.randperm(n, generator=generator(self.seed, self.epoch)).tolist()
        if n >= self.world:
            for s in order[self.rank::self.world]:
                yield from self.source.samples(s)
        else:  # too few shards to split: everybody reads all, keeps every world-th sample
            for i, raw in enumerate(itertools.chain.from_iterable(self.source.samples(s) for s in order)):
                if i % self.world == self.rank:
                    yield raw

    def _item(self, raw: RawSample):
        name = f"{self.source.shards[raw.shard]}:{raw.key}"
        if raw.skip:
            return _Skipped(raw.skip, name)
        if raw.image is None:
            return _Skipped("no-image", name)
        out = _crop_sample(raw.image, self.size, self.scale, generator(self.seed, self.epoch, raw.shard, raw.offset))
        if isinstance(out, _Skipped):
            out.name = name
            return out
        return out, (raw.shard << 32) + raw.offset

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        raw = itertools.islice(self._stream(), self.start_batch * self.batch_size, None)
        # Micro-batch k (counted from the resume point) is decoded by worker k % workers, matching the order in
        # which DataLoader collects worker outputs; the other workers only skip over its raw bytes.
        for k in itertools.count():
            chunk = list(itertools.islice(raw, self.batch_size))
            if not chunk:
                return
            if k % workers == worker:
                yield [self._item(r) for r in chunk]


@dataclass
class SkipStats:
    """Counts of samples seen and skipped (per rank); ``merge`` to combine ranks."""

    seen: int = 0
    skipped: int = 0
    by_reason: dict = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def add(self, seen: int, reasons: list[str]) -> None:
        self.seen += seen
        self.skipped += len(reasons)
        for r in reasons:
            self.by_reason[r] = self.by_reason.get(r, 0) + 1

    def summary(self) -> str:
        """``"skipped 3 of 1000 samples (0.3%): corrupt 2, empty-file 1"``."""
        line = f"skipped {self.skipped} of {self.seen} samples ({100 * self.fraction:.1f}%)"
        reasons = sorted(self.by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
        return line + (": " + ", ".join(f"{r} {n}" for r, n in reasons) if reasons else "")

    def check(self, limit: float, min_seen: int = 200) -> None:
        """Raise :class:`ConfigError` when more than ``limit`` of the samples seen were skipped, counting at least
        ``min_seen``: early on, ``limit * min_seen`` bad samples are allowed before the share is judged, and
        ``limit=0`` stops at the first bad sample."""
        if self.skipped > limit * max(self.seen, min_seen):
            raise ConfigError(f"{self.summary()}, more than data.max_skip_fraction={limit}: remove or repair the "
                              f"unreadable files, or raise data.max_skip_fraction")


class Loader:
    """Endless iterator over this rank's micro-batches; epochs follow each other with a new order. Iterate it once
    (its position is shared by every iterator taken from it).

    ``position`` is ``dict(epoch, batch)`` with ``batch`` the micro-batches consumed so far in that epoch; building
    a loader with ``epoch=``, ``start_batch=`` from it continues exactly after them.
    """

    def __init__(self, make_epoch, epoch: int, start_batch: int, epoch_size: int | None):
        self._make_epoch = make_epoch  # (epoch, start_batch) -> iterable of collated batches
        self._epoch, self._batch = epoch, start_batch
        self.epoch_size = epoch_size
        self.stats = SkipStats()
        self._skipped: list[tuple[str, str]] = []

    @property
    def position(self) -> dict:
        return {"epoch": self._epoch, "batch": self._batch}

    def check(self, limit: float, min_seen: int = 200) -> None:
        self.stats.check(limit, min_seen)

    def take_skipped(self) -> list[tuple[str, str]]:
        """(name, reason) of every sample skipped since the last call: the trainer names them in the run's log."""
        taken, self._skipped = self._skipped, []
        return taken

    def __iter__(self) -> Iterator[dict]:
        while True:
            produced = False
            if self.epoch_size is None or self._batch < self.epoch_size:
                for batch in self._make_epoch(self._epoch, self._batch):
                    produced = True
                    self._batch += 1
                    self.stats.add(len(batch["index"]) + len(batch["skipped"]), batch["skipped"])
                    self._skipped += zip(batch["skipped_names"], batch["skipped"])
                    yield batch
            if not produced and self._batch == 0:  # an empty epoch from its start would loop forever
                raise ConfigError("the data source yields no samples for this rank: check data.path")
            self._epoch, self._batch = self._epoch + 1, 0


def _ignore_stop_signals(worker_id: int) -> None:
    """Ctrl-C / SIGTERM / SIGHUP reach the whole process group: workers leave them to the trainer, which stops
    cleanly."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def open_files(cfg: DataConfig) -> ImageFolder | ShardSource | None:
    """The folder or shards that ``cfg`` names, listed (so a wrong ``data.path`` fails here, in a second, before
    any model is built); None for the other sources."""
    if cfg.source == "folder":
        return ImageFolder(cfg.path)
    if cfg.source == "webdataset":
        return ShardSource(cfg.path)
    return None


def build_loader(cfg: DataConfig, image_size: int, *, seed: int, rank: int = 0, world: int = 1, batch_size: int,
                 epoch: int = 0, start_batch: int = 0, source=None) -> Loader:
    """This rank's :class:`Loader` of ``batch_size`` crops of ``image_size``, resuming at (epoch, start_batch).

    ``source`` overrides ``cfg.source``: an :class:`ImageFolder`, :class:`SyntheticImages`, :class:`ShardSource`,
    any object with ``__len__`` and ``load(i) -> (key, bytes | PIL.Image)``, or a cache (``__len__`` and
    ``__getitem__(i) -> dict of tensors``, batched by stacking each field).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    if source is None:
        source = open_files(cfg)
    if source is None:
        if cfg.source != "synthetic":
            raise ConfigError(f"data.source={cfg.source} needs its dataset passed to build_loader(source=...)")
        source = SyntheticImages(cfg.synthetic_size, size=image_size)
    workers = cfg.num_workers
    loader_kw = dict(num_workers=workers, collate_fn=partial(_collate, size=image_size), persistent_workers=False,
                     worker_init_fn=_ignore_stop_signals if workers > 0 else None)
    if workers > 0:
        loader_kw["prefetch_factor"] = cfg.prefetch_factor

    def data_loader(dataset, e: int, **kw) -> DataLoader:
        # DataLoader draws its workers' base seed from `generator`; without one it would consume the global torch
        # RNG at every epoch start, shifting e.g. dropout masks after a resume. (Crops do not use that seed.)
        return DataLoader(dataset, generator=generator("workers", seed, rank, e), **kw, **loader_kw)

    if isinstance(source, ShardSource):
        def shard_epoch(e: int, start: int):
            batches = _ShardBatches(source, image_size, cfg.crop_scale, seed, e, rank, world, batch_size, start)
            return data_loader(batches, e, batch_size=None)
        return Loader(shard_epoch, epoch, start_batch, None)

    items = _MapItems(source, image_size, cfg.crop_scale, seed)
    global_batch = batch_size * world
    epoch_size = len(items) // global_batch
    if epoch_size == 0:
        raise ConfigError(f"the dataset has {len(items)} samples, fewer than one global batch of {global_batch} "
                          f"(train.batch_size x processes): add images or lower train.batch_size")

    def map_epoch(e: int, start: int):
        sampler = _RankBatches(len(items), seed, e, rank, batch_size, global_batch, range(start, epoch_size))
        return data_loader(items, e, batch_sampler=sampler)
    return Loader(map_epoch, epoch, start_batch, epoch_size)
