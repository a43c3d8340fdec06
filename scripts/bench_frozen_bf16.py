#!/usr/bin/env python
"""train.frozen_bf16 at the tiny preset on CPU: the stage-1 step from images with the frozen encoders in bf16
vs all fp32, alternated in one run, and the error bf16 puts on what those encoders hand to the step.

Prints every run's median s/it, the median over runs of each, their ratio (target: <= 0.85), and the relative
error ||x_bf16 - x_fp32|| / ||x_fp32|| of the latents (the autoencoder's target) and of the condition tokens (the
vision encoder's), on the bench's own synthetic images.

    OMP_NUM_THREADS=1 python scripts/bench_frozen_bf16.py [--batch-size 16] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from genhancer.bench import bench, preset_base
from genhancer.cli import prepare_process
from genhancer.config import load_config
from genhancer.data import SyntheticImages
from genhancer.enhancer import apply_stage, build_enhancer


def errors(cfg, n: int = 64) -> dict[str, float]:
    """Relative error of the latents and of the condition tokens with the frozen encoders in bf16."""
    torch.manual_seed(cfg.train.seed)
    enh = build_enhancer(cfg)
    apply_stage(enh, cfg.stage)
    images = SyntheticImages(n, size=enh.image_size, seed=1)
    pixels = torch.stack([torch.from_numpy(np.array(images.load(i)[1])).permute(2, 0, 1) for i in range(n)])
    pixels = pixels.float() / 255
    out = {}
    for flag in (False, True):
        enh.frozen_bf16 = flag
        with torch.no_grad():
            out[flag] = enh.target({"pixels": pixels}), enh.tokens(pixels, local=False)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    return {"latents": rel(out[True][0], out[False][0]), "tokens": rel(out[True][1], out[False][1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    prepare_process()  # as the CLI does: freed host memory kept without a GPU, third-party noise filtered
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); load average "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    medians = {"fp32": [], "frozen bf16": []}
    with tempfile.TemporaryDirectory() as work:
        base = preset_base("tiny", Path(work))
        flags = ["data.source=synthetic", f"train.batch_size={args.batch_size}"]
        cfgs = {"fp32": load_config(None, flags, base=base),
                "frozen bf16": load_config(None, flags + ["train.frozen_bf16=true"], base=base)}
        err = errors(cfgs["frozen bf16"])
        print(f"relative error with the frozen encoders in bf16: latents {err['latents']:.2%}, "
              f"condition tokens {err['tokens']:.2%}")
        for r in range(args.repeats):
            for name, cfg in (cfgs.items() if r % 2 == 0 else reversed(cfgs.items())):
                rec = bench(cfg, warmup=args.warmup, steps=args.steps)
                medians[name].append(rec["s_per_it"])
                print(f"run {r + 1} {name:>11}: median {rec['s_per_it']:.4f} s/it")
    fp32, bf16 = statistics.median(medians["fp32"]), statistics.median(medians["frozen bf16"])
    print(f"median over runs: fp32 {fp32:.4f} s/it, frozen encoders in bf16 {bf16:.4f} s/it: ratio {bf16 / fp32:.2f} "
          f"(target <= 0.85); load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
