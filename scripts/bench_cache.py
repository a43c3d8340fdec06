#!/usr/bin/env python
"""Stage-1 step time from the encoder cache vs from images, at the tiny preset on CPU, in one run.

Alternates image and cache benchmarks (so that load from other users of a shared machine hits both alike),
prints every run's median s/it, the median over runs of each, and their ratio (target: >= 3), with the machine.

    OMP_NUM_THREADS=2 python scripts/bench_cache.py [--batch-size 16] [--steps 20] [--repeats 3] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


from genhancer.bench import append_json, bench, machine, preset_base
from genhancer.cli import prepare_process
from genhancer.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="append every run's record to this JSON-lines file")
    args = ap.parse_args()
    prepare_process()  # as the CLI does: freed host memory kept without a GPU, third-party noise filtered

    print(f"machine: {machine()}")
    medians = {"images": [], "cache": []}
    with tempfile.TemporaryDirectory() as work:
        cfg = load_config(None, ["data.source=synthetic", f"train.batch_size={args.batch_size}"],
                          base=preset_base("tiny", Path(work)))
        for r in range(args.repeats):
            for mode in ("images", "cache"):
                rec = bench(cfg, warmup=args.warmup, steps=args.steps, cache=mode == "cache")
                rec["preset"] = "tiny"
                medians[mode].append(rec["s_per_it"])
                print(f"run {r + 1} {mode:6}: median {rec['s_per_it']:.4f} s/it, {rec['images_per_s']:.1f} img/s, "
                      f"peak RSS {rec['peak_memory_gb']:.2f} GB")
                if args.json:
                    append_json(rec, args.json)
    images, cache = statistics.median(medians["images"]), statistics.median(medians["cache"])
    print(f"tiny preset, stage 1, batch {args.batch_size}, {args.steps} timed steps x {args.repeats} runs each:")
    print(f"  from images: {images:.4f} s/it   from cache: {cache:.4f} s/it   ratio {images / cache:.2f}x "
          f"(target >= 3x: {'met' if images / cache >= 3 else 'NOT met'})")
    print(f"machine at the end: {machine()}")


if __name__ == "__main__":
    main()
