"""Cache of frozen encoder outputs: encode a dataset once, train from the cache instead of images.

The autoencoder is frozen in every stage and the vision encoder in stage 1, yet the paper's recipe runs every crop
through both at every step. :func:`build_cache` runs them once and writes sharded safetensors; the trainer reads the
cache with ``data.source=cache data.path=DIR`` through :func:`open_cache`.

What a cache holds per crop (``kind`` in its manifest)
    ``cond`` (built for stage 1): ``target`` (the latent of the crop) and ``cond`` (the condition tokens: the global
    token, then all N patch tokens when ``model.condition=cls+local``, so any ``local_ratio`` draws from them).
    ``pixels`` (built for stage 2 / e2e, where the encoder learns and must see the crop): ``target`` and the crop
    itself as uint8 (lossless: crops are 8-bit images resized, divided by 255).

Which crops
    View k of image i is exactly the crop that the uncached loader draws for image i in epoch k (seeded by
    ``(train.seed, k, i)``, ``data.crop_scale``). With K views the cache holds K x N items, and one epoch over it
    sees every image K times, each time with the crop of one uncached epoch, in a random order over all K x N items.
    With K = 1 and the same seed (and no unreadable image) a cached run sees the very batches of the uncached run's
    first epoch: items are numbered by (view, source index), like the images.

Safety
    The manifest records the crop (seed, scale, views), the resolution, the latent space and backbone (names and a
    hash of their weights), the condition mode and the target shape; :func:`open_cache` refuses a cache that differs
    from the run in any of them, naming what differs.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .backbones import resolve_source
from .config import RunConfig
from .errors import ConfigError, WriteError
from .data import build_loader
from .storage import WRITE_ERRORS, write_fix, write_problem

VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_kind(stage: str) -> str:
    """``cond`` when the encoder is frozen (stage 1), else ``pixels`` (the encoder must see the crop)."""
    return "cond" if stage == "stage1" else "pixels"


def fingerprint(*modules: torch.nn.Module) -> str:
    """Hash of the names, shapes and exact bytes of the modules' parameters and buffers (weights identity)."""
    h = hashlib.blake2b(digest_size=12)
    for module in modules:
        h.update(type(module).__name__.encode())
        tensors = dict(module.state_dict(keep_vars=False))
        tensors.update({f"buffer:{n}": b for n, b in module.named_buffers()})  # non-persistent ones too (mean/std)
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _conditioning_modules(backbone) -> list[torch.nn.Module]:
    """What the condition tokens depend on: the vision tower (and CLIP's visual projection), not the text tower."""
    mods = [backbone.vision]
    if hasattr(backbone.model, "visual_projection"):
        mods.append(backbone.model.visual_projection)
    return mods


def describe(cfg: RunConfig, enh, kind: str) -> dict:
    """Everything a cache's content depends on, for the run ``cfg`` / model ``enh`` (the manifest's checked part)."""
    m = cfg.model
    out = {
        "kind": kind,
        "crop": {"seed": cfg.train.seed, "scale": list(cfg.data.crop_scale)},
        "image_size": enh.image_size,
        "target_shape": list(enh.target_shape),
        "latent": {"name": m.latent, "path": m.latent_path, "downsample": m.latent_downsample,
                   "weights": fingerprint(enh.latent)},
    }
    if kind == "cond":
        out["backbone"] = {"name": m.backbone, "source": resolve_source(m), "condition": m.condition,
                           "weights": fingerprint(*_conditioning_modules(enh.backbone))}
    return out


def _differences(cached: dict, run: dict) -> list[str]:
    """Human-readable 'what: cache X, run Y' entries for every field that matters and differs."""
    checks = [("crop seed (train.seed)", ("crop", "seed")), ("crop scale (data.crop_scale)", ("crop", "scale")),
              ("resolution", ("image_size",)), ("latent target shape", ("target_shape",)),
              ("latent space (model.latent)", ("latent", "name")),
              ("autoencoder weights (model.latent_path)", ("latent", "weights"))]
    if run["kind"] == "cond":
        checks += [("backbone weights (model.backbone / model.weights)", ("backbone", "weights"))]
    out = []
    for what, keys in checks:
        a, b = cached, run
        for k in keys:
            a, b = (a or {}).get(k), (b or {}).get(k)
        if a != b:
            if keys[-1] == "weights":  # hashes mean nothing to a reader: name the sources instead
                a, b = _named(cached, keys[0]), _named(run, keys[0])
            out.append(f"{what}: cache {a}, run {b}")
    if run["kind"] == "cond" and run["backbone"]["condition"] == "cls+local" != cached["backbone"]["condition"]:
        out.append("condition: cache holds the global token only, run needs local tokens (model.condition=cls+local)")
    return out


def _named(d: dict, part: str) -> str:
    p = d.get(part, {})
    label = p.get("source") or p.get("path") or p.get("name")
    return f"{label} [weights {p.get('weights', '?')[:8]}]"


# ----------------------------------------------------------------------------------------------- writing


def build_cache(cfg: RunConfig, out: str | Path, *, views: int = 1, batch_size: int = 64, device: str = "cpu",
                dtype: str = "float32", shard_size: int = 4096, enh=None, log=print) -> Path:
    """Encode ``cfg.data``'s images (``views`` crops each) with ``cfg``'s frozen encoders into ``out``.

    ``cfg.stage.stage`` picks the kind (stage 1: latents + condition tokens; otherwise latents + crops).
    ``enh``: an already built :class:`~genhancer.enhancer.Enhancer` to encode with (default: built from ``cfg``).
    """
    from .enhancer import build_enhancer, init_device

    out = Path(out)
    if cfg.data.source == "cache":
        raise ConfigError("data.source=cache: a cache is built from images; set data.source and data.path to them")
    if views < 1 or batch_size < 1 or shard_size < 1:
        raise ConfigError("--views, --batch-size and --shard-size must be >= 1")
    if dtype not in DTYPES:
        raise ConfigError(f"cache dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"cache folder '{out}' exists and is not empty: choose a new folder")
    enh = enh or build_enhancer(cfg, device=init_device(cfg, device))  # as the run will
    kind = cache_kind(cfg.stage.stage)
    manifest = describe(cfg, enh, kind)  # hashed before the move: no copy back where the weights were built on the CPU
    enh.eval().to(device)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, shard_size)
    local = kind == "cond" and cfg.model.condition == "cls+local"
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    skipped: dict[str, int] = {}
    start = time.perf_counter()
    for view in range(views):
        chunk: list[tuple[torch.Tensor, int]] = []
        for batch in _one_epoch(cfg, enh.image_size, view):
            for reason in batch["skipped"]:
                skipped[reason] = skipped.get(reason, 0) + 1
            chunk += [(p, int(i)) for p, i in zip(batch["pixels"], batch["index"])]
            if len(chunk) >= batch_size:
                writer.add(_encode(enh, chunk, view, kind, local, device, autocast, DTYPES[dtype]))
                chunk = []
        if chunk:
            writer.add(_encode(enh, chunk, view, kind, local, device, autocast, DTYPES[dtype]))
        log(f"view {view + 1}/{views}: {writer.count + writer.pending} items encoded "
            f"({time.perf_counter() - start:.0f}s)")
    writer.close()
    if not writer.count:
        raise ConfigError("no readable image in the data source: check data.path")
    manifest.update(version=VERSION, count=writer.count, views=views, dtype=dtype, shards=writer.shards,
                    crop={**manifest["crop"], "ratio": [3 / 4, 4 / 3], "view_k_is_epoch_k": True},
                    source={"source": cfg.data.source, "path": cfg.data.path, "skipped": skipped},
                    condition_tokens="global + all patches" if local else "global")
    tmp = out / (MANIFEST + ".tmp")
    try:
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out / MANIFEST)  # the manifest comes last: a cache without one is incomplete
    except OSError as e:
        raise writer.failed(e, tmp) from None
    return out


def _one_epoch(cfg: RunConfig, size: int, epoch: int):
    """The trainer's crops of epoch ``epoch``, one image per batch (so no image is dropped as a partial batch)."""
    loader = build_loader(cfg.data, size, seed=cfg.train.seed, batch_size=1, epoch=epoch)
    for batch in loader:
        # The loader is endless; it moves to the next epoch after the last batch of this one.
        if loader.position["epoch"] != epoch:
            return
        yield batch
        if loader.epoch_size is not None and loader.position["batch"] == loader.epoch_size:
            return


@torch.no_grad()
def _encode(enh, chunk, view, kind, local, device, autocast, dtype) -> dict[str, torch.Tensor]:
    pixels = torch.stack([p for p, _ in chunk]).to(device)
    with autocast:
        target = enh.target({"pixels": pixels})
        out = {}
        if kind == "cond":
            out["cond"] = enh.tokens(pixels, local).float()
    out = {k: v.to(dtype).cpu() for k, v in out.items()}
    # code indices stay integers: a bf16 cache would silently round indices above 256
    out["target"] = target.cpu() if not target.is_floating_point() else target.float().to(dtype).cpu()
    if kind == "pixels":
        out["pixels"] = pixels.mul(255).round().to(torch.uint8).cpu()  # crops are 8-bit values / 255: lossless
    out["index"] = torch.tensor([i for _, i in chunk], dtype=torch.long)
    out["view"] = torch.full((len(chunk),), view, dtype=torch.long)
    return out


class _ShardWriter:
    """Accumulates encoded rows and writes ``shard-NNNNN.safetensors`` files of ``shard_size`` rows."""

    def __init__(self, root: Path, shard_size: int):
        self.root, self.shard_size = root, shard_size
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.pending, self.count, self.shards = 0, 0, []

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        for k, v in rows.items():
            self.rows.setdefault(k, []).append(v)
        self.pending += len(rows["index"])
        while self.pending >= self.shard_size:
            self._flush(self.shard_size)

    def close(self) -> None:
        if self.pending:
            self._flush(self.pending)

    def _flush(self, n: int) -> None:
        full = {k: torch.cat(v) for k, v in self.rows.items()}
        name = f"shard-{len(self.shards):05d}.safetensors"
        try:
            save_file({k: v[:n].contiguous() for k, v in full.items()}, str(self.root / name))
        except WRITE_ERRORS as e:  # a full disk is a SafetensorError here, not an OSError
            raise self.failed(e, self.root / name) from None
        self.rows = {k: [v[n:]] for k, v in full.items()}
        self.pending -= n
        self.count += n
        self.shards.append({"file": name, "count": n})

    def failed(self, error: Exception, partial: Path) -> WriteError:
        """Remove every file of the unfinished cache (a cache is whole or absent) and say why it failed."""
        for path in [partial, *(self.root / s["file"] for s in self.shards)]:
            path.unlink(missing_ok=True)
        return WriteError(f"cache {self.root} not written: {write_problem(error)}; its partial files are removed. "
                          f"{write_fix(error, str(self.root))} and run `genhancer cache` again")


# ----------------------------------------------------------------------------------------------- reading


class CacheDataset:
    """Map-style view of a cache: ``ds[i] -> {"target", "cond" | "pixels"}`` as float32 tensors.

    Items are ordered by (view, source index), whatever order they were encoded in, so that item i of a one-view
    cache is image i of the source, as the uncached loader numbers it. Shards are memory-mapped lazily per
    process (handles are not pickled, so DataLoader workers open their own).
    """

    def __init__(self, root: str | Path, manifest: dict):
        self.root, self.manifest = Path(root), manifest
        self.files = [s["file"] for s in manifest["shards"]]
        self.starts, total, keys = [], 0, []
        for s in manifest["shards"]:
            self.starts.append(total)
            total += s["count"]
            with safe_open(str(self.root / s["file"]), framework="pt") as f:
                keys.append(torch.stack([f.get_tensor("view"), f.get_tensor("index")], 1))
        self.count = total
        keys = torch.cat(keys)
        # stable sorts, minor key first: rows ordered by view, then source index
        by_index = torch.argsort(keys[:, 1], stable=True)
        self.rows = by_index[torch.argsort(keys[by_index, 0], stable=True)]
        self.fields = ["target", "cond" if manifest["kind"] == "cond" else "pixels"]
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        r = int(self.rows[i])
        shard = bisect.bisect_right(self.starts, r) - 1
        row = r - self.starts[shard]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.root / self.files[shard]), framework="pt")
        h = self._handles[shard]
        out = {name: h.get_slice(name)[row:row + 1][0] for name in self.fields}
        if "pixels" in out:
            out["pixels"] = out["pixels"].float().div_(255.0)
        return {k: v.float() for k, v in out.items()}

    def __getstate__(self):
        state = copy.copy(self.__dict__)
        state["_handles"] = {}
        return state


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise ConfigError(f"cache folder '{root}' does not exist: build it with `genhancer cache` (data.path=DIR)")
    if not path.is_file():
        raise ConfigError(f"'{root}' is not a complete genhancer cache (no {MANIFEST}): build it with "
                          "`genhancer cache --out DIR`")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != VERSION:
        raise ConfigError(f"cache '{root}' has format version {manifest.get('version')}, this genhancer reads "
                          f"{VERSION}: rebuild it with `genhancer cache`")
    return manifest


def open_cache(cfg: RunConfig, enh) -> CacheDataset:
    """The cache at ``cfg.data.path``, after checking it was built for this run (else :class:`ConfigError`)."""
    root = Path(cfg.data.path)
    manifest = read_manifest(root)
    kind = cache_kind(cfg.stage.stage)
    if manifest["kind"] == "cond" and kind != "cond":
        raise ConfigError(f"cache '{root}' holds condition tokens of a frozen encoder, but {cfg.stage.stage} trains "
                          "the encoder: build a cache with stage.stage={stage2|e2e} (latents + crops)")
    # A crops cache also serves stage 1 (the encoder then runs on the cached crops): check it as such.
    diffs = _differences(manifest, describe(cfg, enh, manifest["kind"]))
    if diffs:
        raise ConfigError(f"cache '{root}' does not match this run ({'; '.join(diffs)}): rebuild it with "
                          "`genhancer cache` and this run's config")
    return CacheDataset(root, manifest)
