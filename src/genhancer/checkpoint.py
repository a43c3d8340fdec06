"""Self-describing checkpoints that are never half-written.

A checkpoint is a folder ``<run>/checkpoints/step-0000123/`` holding

* ``weights.safetensors``: every tensor the run created or changed (the head, and LoRA or tuned encoder weights);
* ``optimizer.safetensors``: the optimizer's state tensors;
* ``state.json``: step, data position, RNG states, counters, the optimizer's param groups, the run's config,
  and a manifest (size and SHA-256 of each file) that tells a complete checkpoint from a truncated one; its own
  ``checksum`` (SHA-256 of the rest of it) makes an edited step or data position a corruption like any other.

It is written to a hidden temporary folder and renamed into place only when complete, so a crash or a full disk
leaves the previous checkpoints intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from .config import RunConfig, from_dict
from .errors import CheckpointError, ConfigError
from .storage import WRITE_ERRORS, write_fix, write_problem

PREFIX = "step-"


def rng_state() -> dict:
    """Every RNG the trainer touches: Python, NumPy, torch CPU (and CUDA when present)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _optimizer_tensors(opt_state: dict) -> tuple[dict, list]:
    tensors = {}
    for idx, entries in opt_state["state"].items():
        for key, value in entries.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, opt_state["param_groups"]


def _optimizer_state(tensors: dict, groups: list) -> dict:
    state: dict = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    return {"state": state, "param_groups": groups}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk (a rename is only durable once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync folders
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _state_checksum(state: dict) -> str:
    """SHA-256 of ``state`` without its ``checksum`` key, in a canonical JSON form (sorted keys)."""
    body = {k: v for k, v in state.items() if k != "checksum"}
    body = json.loads(json.dumps(body))  # as read back: tuples become lists, int keys strings
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _remove(path: Path) -> None:
    """Delete a checkpoint folder so that a crash midway never leaves a half-deleted ``step-*`` folder behind."""
    doomed = path.with_name(f".del-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, weights: dict, optimizer_state: dict, state: dict,
                    keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically, then prune to the ``keep_last`` newest. Returns its folder."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a run killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        opt_tensors, groups = _optimizer_tensors(optimizer_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        manifest = {}
        for name in ("weights.safetensors", "optimizer.safetensors"):
            _fsync(tmp / name)
            manifest[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        payload = {**state, "step": step, "param_groups": groups, "manifest": manifest}
        payload["checksum"] = _state_checksum(payload)
        with open(tmp / "state.json", "w") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        if final.exists():  # a damaged checkpoint of this step, which the run resumed before
            _remove(final)
        os.replace(tmp, final)
        _fsync(root)
    except WRITE_ERRORS as e:  # safetensors reports a full disk as its own SafetensorError, not as an OSError
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir, quiet=True)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"checkpoint of step {step} not written: {write_problem(e)}; {kept}. "
                              f"{write_fix(e)} and rerun with --resume") from None
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest complete checkpoints (damaged ones do not count) and anything newer; delete
    everything older, complete or not."""
    every = list_checkpoints(root.parent)
    complete = [p for p in every if verify(p, deep=False) is None]
    if not complete:
        return
    oldest_kept = complete[-keep_last:][0]
    for old in every:
        if old.name < oldest_kept.name:
            try:
                _remove(old)
            except OSError:  # pruning is housekeeping: never fail a run for it
                pass
    for stale in root.glob(".del-*"):
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify(ckpt: Path, deep: bool = True) -> str | None:
    """None if ``ckpt`` is complete and intact, else what is wrong with it; ``deep=False`` skips the checksums
    (for pruning, which must not re-read gigabytes at every save)."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError):
        return "state.json missing or unreadable"
    manifest = state.get("manifest") if isinstance(state, dict) else None
    if not isinstance(manifest, dict) or not {"weights.safetensors", "optimizer.safetensors"} <= manifest.keys():
        return "state.json has no manifest of the checkpoint's files"
    # checkpoints written before state.json had a checksum are taken on trust
    if "checksum" in state and state["checksum"] != _state_checksum(state):
        return "state.json corrupt (checksum mismatch)"
    for name, meta in manifest.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} truncated"
        if deep and _sha256(path) != meta["sha256"]:
            return f"{name} corrupt (checksum mismatch)"
    return None


def latest_checkpoint(run_dir: Path, quiet: bool = False) -> Path | None:
    """The newest intact checkpoint of a run; broken newer ones are reported and skipped."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        if not quiet:
            warnings.warn(f"skipping checkpoint {ckpt}: {problem}; falling back to an earlier one", stacklevel=2)
    return None


def resolve_checkpoint(path: str | Path, fallback: bool = True) -> Path:
    """A checkpoint folder, given itself or its run folder; ``fallback=False`` refuses a run folder whose newest
    checkpoint is damaged instead of falling back to an older one."""
    p = Path(path)
    if (p / "state.json").is_file():
        problem = verify(p)
        if problem:
            raise CheckpointError(f"checkpoint {p} is unusable: {problem}; pass its run folder to use the newest good one")
        return p
    every = list_checkpoints(p)
    if not fallback and every and (problem := verify(every[-1])):
        raise CheckpointError(f"the newest checkpoint {every[-1]} is unusable: {problem}; pass an older "
                              "checkpoint folder explicitly to use it, or rerun the stage-1 run with --resume")
    ckpt = latest_checkpoint(p)
    if ckpt is None:
        raise CheckpointError(f"no usable checkpoint under '{p}': pass a run folder written by `genhancer train`")
    return ckpt


def load_checkpoint(ckpt: Path) -> tuple[dict, dict, dict]:
    """(weights, optimizer_state, state) of a verified checkpoint folder."""
    state = json.loads((ckpt / "state.json").read_text())
    weights = load_file(str(ckpt / "weights.safetensors"))
    optimizer = _optimizer_state(load_file(str(ckpt / "optimizer.safetensors")), state["param_groups"])
    return weights, optimizer, state


def load_run_config(path: str | Path) -> RunConfig:
    """The config a run or checkpoint folder was trained with."""
    p = Path(path)
    if (p / "state.json").is_file():
        return from_dict(json.loads((p / "state.json").read_text())["config"])
    if (p / "config.yaml").is_file():
        return from_dict(yaml.safe_load((p / "config.yaml").read_text()))
    raise ConfigError(f"'{p}' is not a run or checkpoint folder (no config.yaml / state.json)")
