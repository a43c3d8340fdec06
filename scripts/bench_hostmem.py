#!/usr/bin/env python
"""The training step with glibc's default malloc vs with freed memory kept for reuse (``genhancer.hostmem``).

The setting is process-wide, so each measurement is its own ``genhancer bench`` process, with
``GENHANCER_KEEP_FREED_MEMORY=0`` (glibc's defaults) or ``1`` (the CLI's default), alternated ``--repeats`` times
so that load from other users of a shared machine hits both alike. Prints every run's median s/it with the
process's kernel (system) and user CPU time and its peak resident set, then the median over runs of each setting
and their ratio.

    OMP_NUM_THREADS=1 python scripts/bench_hostmem.py [--stage stage1 stage2] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from genhancer.bench import machine
from genhancer.hostmem import ENV

SETTINGS = {"glibc default": "0", "freed memory kept": "1"}


def run(stage: str, setting: str, args, out: Path) -> dict:
    """One ``genhancer bench`` process; its record with the process's kernel and user CPU seconds added."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, "-m", "genhancer", "bench", "--preset", "tiny", "--stage", stage, "--batch-size",
           str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, ENV: SETTINGS[setting]}, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    record = json.loads(out.read_text().splitlines()[-1])
    return {**record, "sys_s": after.ru_stime - before.ru_stime, "user_s": after.ru_utime - before.ru_utime}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", nargs="+", default=["stage1", "stage2"], choices=["stage1", "stage2"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as work:
        for stage in args.stage:
            medians: dict[str, list[float]] = {name: [] for name in SETTINGS}
            for r in range(args.repeats):
                for setting in SETTINGS if r % 2 == 0 else reversed(SETTINGS):
                    rec = run(stage, setting, args, Path(work) / f"{stage}.jsonl")
                    medians[setting].append(rec["s_per_it"])
                    print(f"{stage} run {r + 1} {setting:>17}: median {rec['s_per_it']:.4f} s/it; process CPU: "
                          f"kernel {rec['sys_s']:.2f} s, user {rec['user_s']:.2f} s; peak RSS "
                          f"{rec['peak_memory_gb']:.2f} GiB", flush=True)
            default, kept = (statistics.median(medians[name]) for name in SETTINGS)
            print(f"tiny preset, {stage}, batch {args.batch_size}: glibc default {default:.4f} s/it, freed memory "
                  f"kept {kept:.4f} s/it: {kept / default:.2f}x the time\n", flush=True)
    print(f"machine at the end: {machine()}")


if __name__ == "__main__":
    main()
