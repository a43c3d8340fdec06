"""Time MMVP-VLM evaluation batched vs pair by pair (the reference protocol's loop) in one run; print the ratios.

Default: two small CLIPs, the one shipped with the package (miniworld: width 96, 3 layers, 64 px) and a random
tiny one (width 32, 2 layers, 32 px, the shipped tokenizer), on a freshly written miniworld MMVP-VLM benchmark
(135 pairs), on CPU with one thread. Both paths are timed end to end (image decoding, preprocessing, tokenising,
model, and the batched path's near-tie rechecks) in alternation on the same machine, together with the towers
alone on the same inputs prepared beforehand (the model compute: image tower, text tower, logits). The figures
are pairwise / batched and batched / model (the evaluation against its model compute), each taken within a round
of the alternation, as the median and range over the rounds. Both paths must agree on every pick and score, or the
script fails.

    OMP_NUM_THREADS=1 python scripts/bench_mmvp.py [--model DIR ...] [--benchmark DIR] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPModel

from genhancer.bench import machine
from genhancer.cli import prepare_process
from genhancer.evaluation import mmvp
from genhancer.evaluation.models import load_model
from genhancer.miniworld.base import shipped_base
from genhancer.miniworld.benchmark import write_mmvp


def random_tiny_clip(out: str) -> str:
    """A random CLIP of width 32, 2 layers, 32 px, with the shipped model's tokenizer, saved to ``out``."""
    base = shipped_base()
    config = CLIPConfig.from_pretrained(base)
    for tower in (config.text_config, config.vision_config):
        tower.hidden_size, tower.intermediate_size, tower.num_hidden_layers, tower.num_attention_heads = 32, 64, 2, 2
    config.vision_config.image_size = 32
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    size = {"height": 32, "width": 32}
    AutoImageProcessor.from_pretrained(base, size={"shortest_edge": 32}, crop_size=size).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def model_compute(model, benchmark: str, batch_size: int):
    """A run of the towers alone on the evaluation's inputs, prepared beforehand: the compute bound."""
    pairs = mmvp.load_benchmark(benchmark)
    images = [pair.read_image(j) for pair in pairs for j in (0, 1)]
    pixels = [model.pixel_values(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    ids = model.tokenize([mmvp.PROMPT + s for pair in pairs for s in pair.statements]).split(batch_size)

    def run():
        image_embeds = torch.cat([model.embed_pixels(p) for p in pixels])
        text_embeds = torch.cat([model.embed_ids(chunk) for chunk in ids])
        return model.logits_per_text(text_embeds.view(len(pairs), 2, -1), image_embeds.view(len(pairs), 2, -1))

    return run


def bench(model_dir: str, benchmark: str, args) -> None:
    """Time both paths and the towers alone on one model, check the paths agree, print medians and ratios."""
    model = load_model(model_dir, args.device)
    runs = {"batched": lambda: mmvp.evaluate(model, benchmark, args.batch_size),
            "pairwise": lambda: mmvp.evaluate_pairwise(model, benchmark),
            "model": model_compute(model, benchmark, args.batch_size)}  # fmt: skip
    results = {name: runs[name]() for name in ("batched", "pairwise")}  # warm-up, and the agreement check
    runs["model"]()
    picks = {name: [(r["pred1"], r["pred2"]) for r in result.rows] for name, result in results.items()}
    if picks["batched"] != picks["pairwise"] or results["batched"].scores != results["pairwise"].scores:
        raise SystemExit(f"{model_dir}: batched and pairwise results differ")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.repeats):
        # the evaluation and its model compute back to back, in alternating order, so that each round's ratio of
        # the two spans well under a second of the machine's drift; the pairwise loop (seconds) after them
        for name in ("batched", "model", "pairwise") if r % 2 == 0 else ("model", "batched", "pairwise"):
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    # ratios within each round, then their median and range: the machine's slow drifts, which move the runs of a
    # round together, cancel out of these
    speedup = sorted(p / b for p, b in zip(times["pairwise"], times["batched"]))
    share = sorted(b / m for b, m in zip(times["batched"], times["model"]))
    print(f"\nmodel: {model_dir} ({model.family}, {sum(p.numel() for p in model.model.parameters()):,} parameters)")
    for name, median in med.items():
        print(f"{name:>9}: median {median * 1e3:7.1f} ms  (runs: {', '.join(f'{t * 1e3:.1f}' for t in times[name])})")
    print(f"identical picks and scores; per round, median [range]: batched vs pairwise "
          f"{statistics.median(speedup):.1f}x [{speedup[0]:.1f}-{speedup[-1]:.1f}] faster; evaluation / model "
          f"compute {statistics.median(share):.3f} [{share[0]:.3f}-{share[-1]:.3f}]")
    print(f"load: {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="CLIP/SigLIP directory (repeatable; default: see above)")
    parser.add_argument("--benchmark", help="MMVP-VLM folder (default: a generated miniworld benchmark)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    prepare_process()  # as the CLI does: freed host memory kept without a GPU, third-party noise filtered
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        benchmark = args.benchmark or str(write_mmvp(os.path.join(tmp, "mmvp")))
        models = args.model or [str(shipped_base()), random_tiny_clip(os.path.join(tmp, "tiny"))]
        print(f"machine: {machine()}")
        print(f"benchmark: {benchmark}; batch size {args.batch_size}; {args.repeats} repeats")
        for model_dir in models:
            bench(model_dir, benchmark, args)


if __name__ == "__main__":
    main()
