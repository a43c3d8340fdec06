"""Fault injection, part 3: a real full disk and unwritable folders.

``train.output_dir`` (or the export / cache folder) is put on a small tmpfs mounted for the test, which is then
filled with a filler file, so every write meets a real ENOSPC from the kernel: safetensors raises its own
``SafetensorError`` then, Python an ``OSError``. Mounting needs root; without it the tests are skipped, saying so.
tmpfs hands out whole 4 KiB pages, so "leave N pages free" decides exactly which write fails.
"""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from cli_runner import run_cli

from genhancer import trainer
from genhancer.checkpoint import list_checkpoints, verify
from genhancer.cli import main

PAGE = 4096


def mount_tmpfs(path: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs, and mounting one needs root")
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def disk(tmp_path):
    """A 16 MiB tmpfs (the tiny run's checkpoint is about 4 MiB), unmounted afterwards."""
    path = tmp_path / "disk"
    mount_tmpfs(path, "size=16M")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave_pages: int = 0) -> None:
    """Fill the disk with a filler file, then give back exactly ``leave_pages`` pages."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as f:
        try:
            while True:
                f.write(bytes(PAGE))
        except OSError as e:
            assert e.errno == errno.ENOSPC
    size = filler.stat().st_size // PAGE * PAGE
    os.truncate(filler, size - leave_pages * PAGE)
    assert os.statvfs(disk).f_bavail == leave_pages


def free(disk: Path) -> None:
    (disk / "filler").unlink()


def pages(path: Path) -> int:
    return math.ceil(path.stat().st_size / PAGE)



def leftovers(run: Path) -> list[str]:
    """Temporary files and folders a failed write could leave."""
    return [str(p) for p in run.rglob("*") if p.name.startswith((".tmp-", ".del-")) or p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("fails_at", ["weights", "optimizer", "state.json"])
def test_a_real_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_clip, overrides, disk, capsys, fails_at):
    run = disk / "run"
    args = ["train", *overrides(tiny_clip, run, steps=1, train__save_every=1)]
    assert main(args) == 0
    first = run / "checkpoints" / "step-0000001"
    # step 2's files are the size of step 1's; config.yaml is rewritten first (max_steps changes): one page
    room = {"weights": 0, "optimizer": pages(first / "weights.safetensors"),
            "state.json": pages(first / "weights.safetensors") + pages(first / "optimizer.safetensors")}[fails_at]
    fill(disk, leave_pages=2 + room)
    resume = ["train", *overrides(tiny_clip, run, steps=2, train__save_every=1), "--resume"]
    code, out, err = run_cli(resume, capsys)
    assert code == 2 and err == [f"error: checkpoint of step 2 not written: the disk is full; the previous checkpoint "
                                 f"{first} is intact. Free space under train.output_dir and rerun with --resume"]
    assert list_checkpoints(run) == [first] and verify(first) is None and not leftovers(run)
    free(disk)
    code, out, err = run_cli(resume, capsys)
    assert code == 0 and f"resumed from {first} at step 1" in out
    assert [p.name for p in list_checkpoints(run)] == ["step-0000001", "step-0000002"]


# ------------------------------------------------------------------------------------------------ the run's files


def test_a_real_full_disk_at_the_first_metrics_row_leaves_nothing_behind(tiny_clip, overrides, disk, capsys):
    # a fresh run writes .lock and config.yaml (a page each), then the first row of metrics.jsonl
    fill(disk, leave_pages=2)
    run = disk / "run"
    code, out, err = run_cli(["train", *overrides(tiny_clip, run, steps=2)], capsys)
    assert code == 2 and err == [f"error: {run / 'metrics.jsonl'} (step 1) not written: the disk is full; no "
                                 "checkpoint was written yet. Free space under train.output_dir and start the run "
                                 "again"]
    assert not run.exists()  # a run that wrote no checkpoint into a new folder takes its traces with it


def test_a_real_full_disk_for_config_yaml_and_data_report_json(tiny_clip, overrides, disk, capsys):
    run = disk / "run"
    args = ["train", *overrides(tiny_clip, run, steps=1, train__save_every=1)]
    assert main(args) == 0
    first = run / "checkpoints" / "step-0000001"
    report = (run / "data_report.json").read_text()
    fill(disk)
    # the same settings: config.yaml is not rewritten, the run is complete, and only the report is written again
    code, _, err = run_cli([*args, "--resume"], capsys)
    assert code == 2 and err == [f"error: {run / 'data_report.json'} not written: the disk is full; the last "
                                 f"checkpoint {first} is intact. Free space under train.output_dir and rerun with "
                                 "--resume"]
    assert (run / "data_report.json").read_text() == report and not leftovers(run)
    code, _, err = run_cli(["train", *overrides(tiny_clip, run, steps=2, train__save_every=1), "--resume"], capsys)
    assert code == 2 and err[0].startswith(f"error: {run / 'config.yaml'} not written: the disk is full; the last "
                                           f"checkpoint {first} is intact.")
    assert json.loads((first / "state.json").read_text())["config"]["train"]["max_steps"] == 1
    assert "max_steps: 1\n" in (run / "config.yaml").read_text() and not leftovers(run)


# ------------------------------------------------------------------------------------------------ export and cache


def test_a_real_full_disk_during_export_and_cache(tiny_clip, overrides, tmp_path, disk, capsys):
    run = tmp_path / "run"
    assert main(["train", *overrides(tiny_clip, run, stage="e2e", steps=1, train__save_every=1)]) == 0
    fill(disk)
    code, _, err = run_cli(["export", run, disk / "export"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: export to {disk / 'export'} not written: the "
                                                             "disk is full; its partial files are removed."), err
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    code, _, err = run_cli(["cache", "--out", disk / "cache", "--device", "cpu",
                            *overrides(tiny_clip, tmp_path / "unused", steps=1)], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: cache {disk / 'cache'} not written: the disk "
                                                             "is full; its partial files are removed."), err
    assert list((disk / "cache").iterdir()) == []


# ------------------------------------------------------------------------------------------------ unwritable folders


def refuses_before_any_model(monkeypatch):
    def no_model(*a, **kw):
        raise AssertionError("the model was built before the folder was checked")

    monkeypatch.setattr(trainer, "_build", no_model)


def test_a_read_only_or_uncreatable_output_dir_is_refused_before_any_model(tiny_clip, overrides, tmp_path, disk,
                                                                          capsys, monkeypatch):
    ro = tmp_path / "ro"
    mount_tmpfs(ro, "size=1M,ro")
    try:
        refuses_before_any_model(monkeypatch)
        code, _, err = run_cli(["train", *overrides(tiny_clip, ro / "run")], capsys)
        assert code == 2 and err == [f"error: train.output_dir '{ro / 'run'}' is not writable (the file system is "
                                     "read-only): choose a folder where this user can write"]
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    sealed = disk / "sealed"  # chattr needs a file system that has the flag: tmpfs has it
    sealed.mkdir()
    subprocess.run(["chattr", "+i", str(sealed)], check=True)
    try:
        code, _, err = run_cli(["train", *overrides(tiny_clip, sealed / "a" / "run")], capsys)
        assert code == 2 and len(err) == 1 and f"'{sealed / 'a' / 'run'}' is not writable" in err[0], err
    finally:
        subprocess.run(["chattr", "-i", str(sealed)], check=True)


def test_an_immutable_checkpoint_folder_is_refused_before_any_model(tiny_clip, overrides, disk, capsys, monkeypatch):
    run = disk / "run"
    assert main(["train", *overrides(tiny_clip, run, steps=2)]) == 0
    subprocess.run(["chattr", "+i", str(run / "checkpoints")], check=True)
    try:
        refuses_before_any_model(monkeypatch)
        code, _, err = run_cli(["train", *overrides(tiny_clip, run, steps=4), "--resume"], capsys)
        assert code == 2 and err == [f"error: train.output_dir '{run}' is not writable (operation not permitted, e.g. "
                                     "an immutable folder): choose a folder where this user can write"]
    finally:
        subprocess.run(["chattr", "-i", str(run / "checkpoints")], check=True)
