"""A training run's folder and what it reports: ``config.yaml``, ``metrics.jsonl``, trackers, the progress bar,
``data_report.json``, and the stop flag that turns SIGTERM / SIGINT into a checkpoint and a clean exit."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import yaml
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import checkpoint as ckpt_io
from .config import RunConfig, to_dict
from .errors import ConfigError


def check_run_dir(cfg: RunConfig, resume: bool) -> Path:
    """The run folder; refuse to overwrite a run by accident (created later, once everything is checked)."""
    run = Path(cfg.train.output_dir)
    if run.exists() and not run.is_dir():
        raise ConfigError(f"train.output_dir '{run}' is a file: choose a folder")
    parent = next((p for p in run.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"train.output_dir '{run}' is inside '{parent}', which is a file: choose a folder")
    if ckpt_io.list_checkpoints(run) and not resume:
        raise ConfigError(f"'{run}' already holds checkpoints of a run: pass --resume to continue it, "
                          "or choose another train.output_dir")
    return run


def open_run_dir(acc: Accelerator, run: Path, cfg: RunConfig, step: int) -> None:
    """Everything is checked: only now does the run leave traces on disk (config.yaml, metrics up to ``step``)."""
    if acc.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        _truncate_metrics(run / "metrics.jsonl", step)
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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)


class RunLog:
    """The progress bar (every step), ``metrics.jsonl`` (main process) and trackers (every ``train.log_every``
    steps and the last)."""

    def __init__(self, acc: Accelerator, run: Path, cfg: RunConfig, step: int, total: int):
        if acc.log_with:
            acc.init_trackers("genhancer", config=_flat(to_dict(cfg)))
        self.acc, self.every, self.total = acc, cfg.train.log_every, total
        self.metrics = open(run / "metrics.jsonl", "a") if acc.is_main_process else None
        self.bar = tqdm(total=total, initial=step, disable=not acc.is_main_process, desc=cfg.stage.stage,
                        dynamic_ncols=True)

    def log(self, record: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
        step = record["step"]
        if step % self.every == 0 or step == self.total:
            if self.metrics:
                self.metrics.write(json.dumps(record) + "\n")
                self.metrics.flush()
            self.acc.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def say(self, line: str) -> None:
        """A line of its own on the main process, not glued to the progress bar."""
        if self.acc.is_main_process:
            tqdm.write(line)

    def close(self) -> None:
        self.bar.close()
        if self.metrics:
            self.metrics.close()


def write_data_report(acc: Accelerator, run: Path, stats, skipped_steps: int) -> None:
    if acc.is_main_process:
        acc.print(f"{stats.summary()}; non-finite steps skipped: {skipped_steps}")
        (run / "data_report.json").write_text(json.dumps(
            {"seen": stats.seen, "skipped": stats.skipped, "by_reason": stats.by_reason,
             "nonfinite_steps": skipped_steps}, indent=1))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class StopFlag:
    """Turns SIGTERM / SIGINT into a request to checkpoint and exit after the current step."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
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
