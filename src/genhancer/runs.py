"""A training run's folder and what it reports: the folder's lock, ``config.yaml``, ``metrics.jsonl``, trackers,
the progress bar, ``data_report.json``, and the stop flag that turns SIGTERM / SIGINT / SIGHUP into a checkpoint
and a clean exit.

Every write goes through ``storage.py``: a full disk or a read-only folder ends the run with one ``error:`` line
(:class:`WriteError`) that says which checkpoint is intact, and leaves no half-written file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import yaml
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import checkpoint as ckpt_io
from .config import RunConfig, to_dict
from .errors import ConfigError, WriteError
from .storage import append_all, write_fix, write_problem, write_text_atomic

LOCK = ".lock"
TRACES = ("config.yaml", "metrics.jsonl", "data_report.json", LOCK)  # what a run writes


class RunFolder:
    """``train.output_dir`` for the run's whole life: checked, created and locked on entry (main process only).

    The lock is an exclusive ``flock`` on ``<run>/.lock``, which holds the PID of its owner. The kernel drops it
    when the process ends, however it ends, so a killed run never blocks the ``--resume`` that follows it. A run
    that fails before it has written a checkpoint into a folder that held no run removes what it wrote, so that
    the folder does not look like a run to resume.
    """

    def __init__(self, cfg: RunConfig, resume: bool, main: bool = True, anyone=bool):
        """``anyone(flag)``: whether ``flag`` is set on any process (collective), so that every process stops when
        the main one cannot take the folder, instead of waiting for it in a collective."""
        self.path, self.resume, self.main, self._anyone = Path(cfg.train.output_dir), resume, main, anyone
        self._fd: int | None = None
        self._created = self._fresh = False

    def __enter__(self) -> "RunFolder":
        error = None
        try:
            self._open()
        except ConfigError as e:
            error = e
        if self._anyone(error is not None):
            self._release(remove=True)
            raise error or ConfigError(f"the main process could not take train.output_dir '{self.path}': see its "
                                       "error line")
        return self

    def _open(self) -> None:
        run = self.path
        if run.exists() and not run.is_dir():
            raise ConfigError(f"train.output_dir '{run}' is a file: choose a folder")
        parent = next((p for p in run.absolute().parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise ConfigError(f"train.output_dir '{run}' is inside '{parent}', which is a file: choose a folder")
        self._fresh = not (run / "config.yaml").is_file() and not ckpt_io.list_checkpoints(run)
        if self.resume and self._fresh:
            raise ConfigError(f"nothing to resume in {run}: check train.output_dir, or drop --resume to start a new "
                              "run")
        if not self.main:
            return
        self._created = not run.exists()
        try:
            run.mkdir(parents=True, exist_ok=True)
            self._lock()
            for folder in (run, run / "checkpoints"):  # e.g. an immutable checkpoints/: refuse now, not at step 1000
                if folder.is_dir():
                    fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
                    os.close(fd)
                    os.unlink(probe)
        except OSError as e:
            self._release(remove=True)
            problem = write_problem(e)
            fix = "free space on it" if "full" in problem or "quota" in problem else \
                "choose a folder where this user can write"
            raise ConfigError(f"train.output_dir '{run}' is not writable ({problem}): {fix}") from None
        if ckpt_io.list_checkpoints(run) and not self.resume:
            self._release(remove=False)
            raise ConfigError(f"'{run}' already holds checkpoints of a run: pass --resume to continue it, "
                              "or choose another train.output_dir")

    def _lock(self) -> None:
        self._fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self._fd)
            self._fd = None
            raise ConfigError(f"train.output_dir '{self.path}' is in use by another run (PID {holder}): wait for it "
                              "to end or stop it, or choose another train.output_dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def _holder(self, patience: float = 2.0) -> str:
        """The PID in the lock file of a run that holds it. The holder writes its PID just after it takes the lock,
        so a run refused in that instant reads an empty file, or the PID of a run that ended before: read again,
        for up to ``patience`` seconds, until the file names a live process."""
        deadline = time.monotonic() + patience
        while True:
            text = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            if (text.isdigit() and _alive(int(text))) or time.monotonic() > deadline:
                return text or "unknown"
            time.sleep(0.01)

    def _release(self, remove: bool) -> None:
        """Unlock; with ``remove``, first delete what this run wrote into a folder that held no run. Only the
        holder of the lock removes anything: a run refused by the lock must not touch the other's files."""
        if remove and self._fd is not None and self._fresh and not ckpt_io.list_checkpoints(self.path):
            # best effort: this runs on the way out of another error, which must stay the one reported
            with contextlib.suppress(OSError):
                for name in TRACES:
                    (self.path / name).unlink(missing_ok=True)
                if self._created:
                    self.path.rmdir()  # fails, and so stays, if anything else was put there meanwhile
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __exit__(self, exc_type, exc, tb) -> None:
        self._release(remove=exc_type is not None)


def _alive(pid: int) -> bool:
    """Whether a process with this PID exists (another user's included)."""
    if not 0 < pid < 2**31:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only the existence and permission checks
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_failed(what: str, run: Path, error: Exception) -> WriteError:
    """The one-line error of a failed write: what failed and why, which checkpoint is intact, and the fix."""
    last = ckpt_io.latest_checkpoint(run, quiet=True)
    kept, again = (f"the last checkpoint {last} is intact", "rerun with --resume") if last else \
        ("no checkpoint was written yet", "start the run again")
    return WriteError(f"{what} not written: {write_problem(error)}; {kept}. {write_fix(error)} and {again}")


def open_run_dir(acc: Accelerator, run: Path, cfg: RunConfig, step: int) -> None:
    """Everything is checked: only now does the run leave traces on disk (config.yaml, metrics up to ``step``)."""
    if acc.is_main_process:
        text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        config, metrics = run / "config.yaml", run / "metrics.jsonl"
        try:
            if not config.is_file() or config.read_text() != text:  # a resume with the same settings writes nothing
                write_text_atomic(config, text)
        except OSError as e:
            raise write_failed(str(config), run, e) from None
        try:
            _truncate_metrics(metrics, step)
        except OSError as e:
            raise write_failed(str(metrics), run, e) from None
    acc.wait_for_everyone()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a killed run logged after the checkpoint it resumes from (they are recomputed)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a line torn by the kill
            pass
    if len(keep) != len(lines):
        write_text_atomic(path, "".join(keep))


class RunLog:
    """The progress bar (every step), ``metrics.jsonl`` (main process) and trackers (every ``train.log_every``
    steps and the last)."""

    def __init__(self, acc: Accelerator, run: Path, cfg: RunConfig, step: int, total: int):
        if acc.log_with:
            acc.init_trackers("genhancer", config=flat(to_dict(cfg)))
        self.acc, self.run, self.every, self.total = acc, run, cfg.train.log_every, total
        # a raw descriptor, not a buffered file: a full disk fails the write of its step, not a later flush
        self.metrics = os.open(run / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) \
            if acc.is_main_process else None
        self.bar = tqdm(total=total, initial=step, disable=not acc.is_main_process, desc=cfg.stage.stage,
                        dynamic_ncols=True)

    def log(self, record: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
        step = record["step"]
        if step % self.every == 0 or step == self.total:
            if self.metrics is not None:
                try:
                    append_all(self.metrics, (json.dumps(record) + "\n").encode())
                except OSError as e:
                    raise write_failed(f"{self.run / 'metrics.jsonl'} (step {step})", self.run, e) from None
            self.acc.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def say(self, line: str, everywhere: bool = False) -> None:
        """A line of its own on the main process (or on every one), not glued to the progress bar."""
        if everywhere or self.acc.is_main_process:
            tqdm.write(line)

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            os.close(self.metrics)
            self.metrics = None


def write_data_report(acc: Accelerator, run: Path, stats, counters: dict) -> None:
    if acc.is_main_process:
        nonfinite, empty = counters["skipped_steps"], counters.get("empty_steps", 0)
        acc.print(f"{stats.summary()}; non-finite steps skipped: {nonfinite}"
                  + (f"; steps without a readable image skipped: {empty}" if empty else ""))
        try:
            write_text_atomic(run / "data_report.json", json.dumps(
                {"seen": stats.seen, "skipped": stats.skipped, "by_reason": stats.by_reason,
                 "nonfinite_steps": nonfinite, "empty_steps": empty}, indent=1))
        except OSError as e:
            raise write_failed(str(run / "data_report.json"), run, e) from None


def flat(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, non-scalar values as strings (for trackers, and to compare configs)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class StopFlag:
    """Turns SIGTERM (pre-emption), SIGINT (Ctrl-C) and SIGHUP (a closed terminal or SSH session) into a request to
    checkpoint and exit after the current step."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
