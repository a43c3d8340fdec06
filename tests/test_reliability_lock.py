"""Fault injection, part 4: two runs in one folder, with real processes.

A run holds an exclusive ``flock`` on ``<run>/.lock`` for its whole life. A second run, or a ``--resume``, into a
folder in use exits 2 naming the folder and the PID holding it; a run killed with SIGKILL leaves a lock file that
the kernel has already released, so the ``--resume`` that follows goes ahead.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from cli_runner import run_cli

from genhancer.checkpoint import latest_checkpoint, list_checkpoints, verify
from genhancer.cli import main


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "genhancer", *map(str, args)], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def errors(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("error:")]


def test_two_runs_started_at_once_one_gets_the_folder_the_other_exits_2(tiny_clip, overrides, tmp_path):
    run = tmp_path / "run"
    args = ["train", *overrides(tiny_clip, run, steps=1000, train__save_every=1000)]  # runs until stopped
    procs = [start(args, tmp_path / f"{i}.log") for i in range(2)]
    try:
        deadline = time.monotonic() + 300
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "neither run stopped"
            time.sleep(0.05)
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = procs[1 - loser]
        assert procs[loser].returncode == 2 and winner.poll() is None, (tmp_path / f"{loser}.log").read_text()[-1500:]
        assert errors(tmp_path / f"{loser}.log") == [
            f"error: train.output_dir '{run}' is in use by another run (PID {winner.pid}): wait for it to end or "
            "stop it, or choose another train.output_dir"]
        wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text(), winner,
                 "a first step")
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(120) == 0
    finally:
        for p in procs:
            p.kill()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one run's rows, each once
    assert [p.name for p in list_checkpoints(run)] == [f"step-{len(steps):07d}"]
    # the refused run touched none of the winner's files, its lock file included
    assert (run / ".lock").read_text().strip() == str(winner.pid) and (run / "config.yaml").is_file()


def test_a_run_in_use_refuses_a_resume_and_a_kill_releases_the_lock(tiny_clip, overrides, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *overrides(tiny_clip, run, steps=1000, train__save_every=1, train__keep_last=1)]
    holder = start(args, tmp_path / "holder.log")
    try:
        wait_for(lambda: list_checkpoints(run), holder, "a first checkpoint")
        second = start([*args, "--resume"], tmp_path / "second.log")
        assert second.wait(120) == 2
        assert errors(tmp_path / "second.log") == [
            f"error: train.output_dir '{run}' is in use by another run (PID {holder.pid}): wait for it to end or stop "
            "it, or choose another train.output_dir"]
        holder.send_signal(signal.SIGKILL)  # mid-run, holding the lock; its .lock file stays behind
        assert holder.wait(30) == -signal.SIGKILL
    finally:
        holder.kill()
    assert (run / ".lock").read_text().strip() == str(holder.pid)
    capsys.readouterr()
    last = latest_checkpoint(run)
    step = int(last.name[5:])
    resume = ["train", *overrides(tiny_clip, run, steps=step + 1, train__save_every=1, train__keep_last=1), "--resume"]
    assert main(resume) == 0
    assert f"resumed from {last} at step {step}" in capsys.readouterr().out
    assert verify(run / "checkpoints" / f"step-{step + 1:07d}") is None
    assert (run / ".lock").read_text().strip() == str(os.getpid())


def test_a_run_refused_before_the_holder_wrote_its_pid_waits_for_it(tiny_clip, overrides, tmp_path, capsys):
    """The race of two runs started at once, made certain: the lock is taken, but its file still holds the PID of
    a run that ended (then nothing) when the second run reads it. The holder's PID comes a moment later."""
    run = tmp_path / "run"
    run.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()  # a PID no process has now
    (run / ".lock").write_text(f"{gone.pid}\n")
    fd = os.open(run / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file description: it conflicts in this process

    def take_it_like_a_run():
        time.sleep(0.3)
        os.ftruncate(fd, 0)
        time.sleep(0.3)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    holder = threading.Thread(target=take_it_like_a_run)
    holder.start()
    try:
        code, _, errs = run_cli(["train", *overrides(tiny_clip, run, steps=1)], capsys)
    finally:
        holder.join()
        os.close(fd)
    assert code == 2 and errs == [
        f"error: train.output_dir '{run}' is in use by another run (PID {os.getpid()}): wait for it to end or stop "
        "it, or choose another train.output_dir"]
