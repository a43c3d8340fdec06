"""Fault injection, part 1: runs that are killed, stopped or resumed from a damaged checkpoint.

The runs that are compared with an uninterrupted one are all the same tiny e2e run (LoRA with dropout on the
encoder + the head, gradient accumulation, epochs of two steps), so that dropout masks, objective draws, data order
and crops all have to line up after a resume; the reference run is made once per module. The signal tests use a
cheaper stage-1 run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genhancer import trainer
from genhancer.checkpoint import list_checkpoints, verify
from genhancer.cli import main

STEPS = 5
RUN = dict(stage="e2e", train__batch_size=1, train__grad_accum=2, data__synthetic_size=4, train__save_every=2,
           train__keep_last=2, optim__lr=1e-2)


def run_args(overrides, backbone, out, steps=STEPS, **extra):
    return ["train", *overrides(backbone, out, steps=steps, **{**RUN, **extra})]


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(ckpt / "weights.safetensors")),
            **{f"optimizer.{k}": v for k, v in load_file(str(ckpt / "optimizer.safetensors")).items()}}


def assert_same_checkpoint(got: Path, want: Path) -> None:
    """Weights and optimizer state equal bit for bit, and the same data position and step."""
    a, b = tensors(got), tensors(want)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
    sa, sb = (json.loads((p / "state.json").read_text()) for p in (got, want))
    assert (sa["step"], sa["data_position"], sa["counters"]) == (sb["step"], sb["data_position"], sb["counters"])


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def reference(tiny_clip, tmp_path_factory):
    """The uninterrupted run (made in this process, as the resumed runs are)."""
    from conftest import tiny_overrides

    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(run_args(tiny_overrides, tiny_clip, out)) == 0
    return out


def final(run: Path) -> Path:
    return run / "checkpoints" / f"step-{STEPS:07d}"


def test_reference_run_keeps_the_last_two_checkpoints(reference):
    # save_every=2 over 5 steps writes 2, 4 and 5; keep_last=2 prunes 2
    assert [p.name for p in list_checkpoints(reference)] == ["step-0000004", "step-0000005"]
    assert all(verify(p) is None for p in list_checkpoints(reference))
    assert [m["step"] for m in metrics(reference)] == list(range(1, STEPS + 1))


def start(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m genhancer train ...`` with the thread count of this process (same float reductions)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "genhancer", *args], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_steps(proc: subprocess.Popen, run: Path, n: int, timeout: float = 120) -> None:
    """Poll metrics.jsonl (log_every=1) until the run has logged ``n`` steps."""
    deadline = time.monotonic() + timeout
    while len(metrics(run)) < n:
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before step {n}"
        assert time.monotonic() < deadline, f"no step {n} after {timeout} s"
        time.sleep(0.02)


def test_sigkill_at_a_random_step_then_resume_matches_the_uninterrupted_run(reference, tiny_clip, overrides,
                                                                            tmp_path, capsys):
    kill_after = random.Random().randint(1, STEPS - 2)  # 1: no checkpoint yet, 2: just saved, 3: between saves
    run, log = tmp_path / "run", tmp_path / "killed.log"
    proc = start(run_args(overrides, tiny_clip, run), log)
    try:
        wait_for_steps(proc, run, kill_after)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(metrics(run))
    assert killed_at < STEPS, f"the run finished before the kill (asked after step {kill_after})"
    before = [p.name for p in list_checkpoints(run)]

    capsys.readouterr()
    assert main([*run_args(overrides, tiny_clip, run), "--resume"]) == 0
    out = capsys.readouterr().out
    context = f"killed after step {killed_at}, checkpoints then: {before}"
    if before:
        assert f"resumed from {run / 'checkpoints' / before[-1]}" in out, context
    assert_same_checkpoint(final(run), final(reference))
    # the steps logged after the last checkpoint by the killed run are dropped, not duplicated
    assert [m["step"] for m in metrics(run)] == list(range(1, STEPS + 1)), context
    assert [m["loss"] for m in metrics(run)] == [m["loss"] for m in metrics(reference)], context
    # the data report counts every sample of the run once, across the kill
    assert (run / "data_report.json").read_text() == (reference / "data_report.json").read_text(), context


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_0(tiny_clip, overrides, tmp_path, sig):
    """Pre-emption (SIGTERM) or a closed terminal (SIGHUP): a real subprocess with a long budget gets the signal once
    it has logged a step. (Resuming from the checkpoint it leaves is what the SIGKILL test checks bit for bit.)"""
    run, log = tmp_path / "run", tmp_path / "term.log"
    proc = start(run_args(overrides, tiny_clip, run, steps=1000, stage="stage1", train__save_every=1000), log)
    try:
        wait_for_steps(proc, run, 1)
        proc.send_signal(sig)
        assert proc.wait(120) == 0, log.read_text()[-2000:]
    finally:
        proc.kill()
    text = log.read_text()
    stopped = re.findall(r"^stopped by signal (\d+) after step (\d+); checkpoint: (\S+); continue with --resume$",
                         text, re.MULTILINE)  # a line of its own, not glued to the progress bar
    assert len(stopped) == 1, text[-2000:]
    signum, step, ckpt = int(stopped[0][0]), int(stopped[0][1]), Path(stopped[0][2])
    assert signum == sig and ckpt == run / "checkpoints" / f"step-{step:07d}" and verify(ckpt) is None
    assert json.loads((ckpt / "state.json").read_text())["step"] == step
    assert list_checkpoints(run) == [ckpt] and len(metrics(run)) == step < 1000
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_sigint_in_process_stops_after_the_step_and_restores_handlers(tiny_clip, overrides, tmp_path, capsys,
                                                                      monkeypatch):
    """Ctrl-C at the start of step 2 (lr_at is the first thing a step calls): step 2 completes and is saved."""
    lr_at = trainer.lr_at

    def interrupt_at_step_1(step, *a):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, *a)

    monkeypatch.setattr(trainer, "lr_at", interrupt_at_step_1)
    run, handler = tmp_path / "run", signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    assert main(run_args(overrides, tiny_clip, run, stage="stage1", train__save_every=1000)) == 0
    ckpt = run / "checkpoints" / "step-0000002"
    assert f"stopped by signal {int(signal.SIGINT)} after step 2; checkpoint: {ckpt}" in capsys.readouterr().out
    assert list_checkpoints(run) == [ckpt] and verify(ckpt) is None
    assert signal.getsignal(signal.SIGINT) is handler


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0xFF  # inside the tensor data: same size, wrong checksum
    path.write_bytes(bytes(data))


def garble(path: Path) -> None:
    path.write_text('{"step": 5, "manif')


def edit_step(path: Path) -> None:
    """A hand edit that keeps valid JSON and a consistent manifest."""
    text = path.read_text()
    assert '"step": 5' in text
    path.write_text(text.replace('"step": 5', '"step": 4'))


def edit_position(path: Path) -> None:
    state = json.loads(path.read_text())
    state["data_position"]["batch"] += 1
    path.write_text(json.dumps(state))


@pytest.mark.parametrize("damage, name, problem", [
    (truncate, "weights.safetensors", "weights.safetensors truncated"),
    (flip_a_byte, "optimizer.safetensors", "optimizer.safetensors corrupt (checksum mismatch)"),
    (garble, "state.json", "state.json missing or unreadable"),
    (edit_step, "state.json", "state.json corrupt (checksum mismatch)"),
    (edit_position, "state.json", "state.json corrupt (checksum mismatch)"),
])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, tiny_clip, overrides, tmp_path, capsys,
                                                                  damage, name, problem):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    damage(final(run) / name)
    capsys.readouterr()
    with pytest.warns(UserWarning, match=f"skipping checkpoint .*step-0000005: {re.escape(problem)}; falling back"):
        assert main([*run_args(overrides, tiny_clip, run), "--resume"]) == 0
    assert f"resumed from {run / 'checkpoints' / 'step-0000004'} at step 4" in capsys.readouterr().out
    assert verify(final(run)) is None  # rewritten in place of the damaged one
    assert_same_checkpoint(final(run), final(reference))
