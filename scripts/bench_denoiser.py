"""Time our FLUX-like denoiser against diffusers' FluxTransformer2DModel, side by side; print ours / diffusers.

Both networks get the same architecture, the same weights (ours, copied into diffusers' layout by
``genhancer.denoisers.flux_diffusers``; the outputs are checked to match before anything is timed) and the same
inputs. For every precision (fp32; bf16 = autocast over fp32 weights, as training runs), mode (train = forward +
backward of a mean-square loss; forward = under ``torch.no_grad``, as sampling runs), image token count and batch
size, the two are timed in alternation, ``--rounds`` times, the order swapped every round, so a load that comes and
goes hits both alike. The figure is the median over rounds of ours / diffusers (below 1: ours is faster), with the
quartiles of the per-round ratios as its spread.

Peak memory is the most bytes the framework's allocator held at once during one step, above what it held before
the step: every activation and backward temporary is in it; weights, inputs and the gradient buffers (made in
the warm-up steps, then accumulated into, as in training) are not. On CUDA it is
``torch.cuda.max_memory_allocated``; on CPU it is the running sum of the allocation and free records of
``torch.profiler`` (``profile_memory=True``), which sees every tensor the CPU allocator hands out. The process's
resident set would not do: glibc keeps freed memory, and the Python runtime dwarfs these activations.

    OMP_NUM_THREADS=1 python scripts/bench_denoiser.py                   # hidden 256, 2 + 4 blocks (CPU-sized)
    python scripts/bench_denoiser.py --device cuda                       # + the paper preset (hidden 3072)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from genhancer.bench import machine
from genhancer.cli import prepare_process
from genhancer.denoisers import DENOISERS
from genhancer.denoisers.flux import Flux
from genhancer.denoisers.flux_diffusers import diffusers_call, diffusers_config, to_diffusers
from genhancer.threads import cpu_bf16

MiB = 2**20


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else ""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(call, train: bool, precision: str, device) -> None:
    """One forward (+ backward) under the precision's autocast."""
    with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"), torch.set_grad_enabled(train):
        out = call()
    if train:
        out.float().square().mean().backward()


def peak_bytes(fn, device) -> int:
    """Bytes the allocator held at most during ``fn()`` above what it held before (see the module docstring)."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, nbytes in records:
        held += nbytes
        peak = max(peak, held)
    return peak


def inputs(arch, batch: int, tokens: int, context: int, device):
    g = torch.Generator().manual_seed(0)
    side = int(tokens**0.5)
    assert side * side == tokens, "image tokens must be a square grid"
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    tensors = (torch.randn(batch, tokens, arch.in_channels, generator=g), img_ids.reshape(tokens, 3),
               torch.randn(batch, context, arch.ctx_dim, generator=g), torch.zeros(context, 3),
               torch.rand(batch, generator=g), torch.randn(batch, arch.vec_dim, generator=g))
    return [x.to(device) for x in tensors]


def build(arch, device):
    torch.manual_seed(0)
    with device:  # built where it runs: on a GPU the paper preset's 1.3 B weights are drawn in a moment, not 30 s
        ours = Flux(arch)
    with torch.no_grad():  # random everywhere: zero-initialised gates would let both skip nothing anyway
        for p in ours.parameters():
            p.normal_(0, 0.02)
    return ours, to_diffusers(ours)


def agreement(ours, theirs, x, arch) -> str:
    """Check the two compute the same function (fp32) and say how far bf16 takes each from it."""
    with torch.no_grad():
        fp32 = ours(*x)
        error = (diffusers_call(theirs, *x, arch.guidance) - fp32).abs().max() / fp32.abs().max()
        if error > 1e-4:
            raise SystemExit(f"diffusers' output differs from ours by {error:.2e} (relative): not the same function")
        with torch.autocast(x[0].device.type, torch.bfloat16):
            outs = ours(*x), diffusers_call(theirs, *x, arch.guidance)
        dev = [(out.float() - fp32).norm() / fp32.norm() for out in outs]
    return (f"fp32 outputs equal to {error:.1e}; bf16 autocast off fp32 by {dev[0]:.2%} (ours) vs {dev[1]:.2%} "
            "(diffusers)")


def compare(arch, batch, tokens, args, device, precision, train, models):
    ours, theirs = models
    x = inputs(arch, batch, tokens, args.context, device)
    calls = {"ours": lambda: ours(*x), "diffusers": lambda: diffusers_call(theirs, *x, arch.guidance)}
    run = {name: (lambda c=c: step(c, train, precision, device)) for name, c in calls.items()}
    for model in models:
        model.zero_grad(set_to_none=True)
    for fn in run.values():  # warm-up: first-call costs, and gradients allocated once as in training
        for _ in range(args.warmup):
            fn()
    peak = {name: peak_bytes(fn, device) for name, fn in run.items()}
    times = {name: [] for name in run}
    for r in range(args.rounds):
        for name in (("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours")):
            sync(device)
            start = time.perf_counter()
            for _ in range(args.reps):
                run[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) / args.reps)
    ratios = [a / b for a, b in zip(times["ours"], times["diffusers"])]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{precision:>4} {'train' if train else 'fwd':>5} {tokens:>6} {batch:>5}  {med['ours'] * 1e3:9.1f} "
          f"{med['diffusers'] * 1e3:9.1f}  {statistics.median(ratios):5.3f} [{q1:.3f}-{q3:.3f}]  "
          f"{peak['ours'] / MiB:8.1f} {peak['diffusers'] / MiB:8.1f}  {peak['ours'] / peak['diffusers']:5.3f}",
          flush=True)


def parameter_counts():
    arch = DENOISERS["flux-paper"].arch
    with torch.device("meta"):
        from diffusers import FluxTransformer2DModel

        ours, theirs = Flux(arch), FluxTransformer2DModel(**diffusers_config(arch))
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    print(f"parameters at the paper preset (meta device): ours {n_ours:,}, diffusers {n_theirs:,}"
          + (" (identical: diffusers splits each fused q/k/v projection into three linears of the same total size)"
             if n_ours == n_theirs else f" (differ by {n_ours - n_theirs:,})"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--double", type=int, default=2, help="MM-DiT blocks")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256], help="image tokens (square grids)")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--context", type=int, default=1, help="context tokens (1: the [CLS] condition)")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"],
                        help="default: fp32 and bf16 (fp32 only on a CPU that emulates bf16)")
    parser.add_argument("--mode", nargs="+", default=["train", "forward"], choices=["train", "forward"])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--reps", type=int, default=1, help="steps per timed measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--paper", action=argparse.BooleanOptionalAction, default=None,
                        help="also the paper preset (hidden 3072), batch 2 and 16, 196 tokens, bf16 (default: on CUDA)")
    args = parser.parse_args()
    prepare_process()  # as the CLI does: freed host memory kept without a GPU, third-party noise filtered
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine(device.type == 'cuda')}")
    if args.precision is None:
        args.precision = ["fp32", "bf16"] if device.type == "cuda" or cpu_bf16() else ["fp32"]
        if "bf16" not in args.precision:
            print("bf16 rows skipped: this CPU emulates every bf16 product (16x the fp32 time here, the same work in "
                  "both networks); --precision fp32 bf16 runs them")
    parameter_counts()
    head_dim = args.hidden // args.heads
    small = dataclasses.replace(DENOISERS["flux-small"].arch, hidden=args.hidden, heads=args.heads,
                                depth_double=args.double, depth_single=args.single, in_channels=64,
                                vec_dim=args.hidden, ctx_dim=args.hidden,
                                axes_dim=(head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16))
    runs = [(small, args.tokens, args.batch, args.precision)]
    if args.paper if args.paper is not None else device.type == "cuda":
        runs.append((DENOISERS["flux-paper"].arch, [196], [2, 16], ["bf16"]))
    for arch, token_counts, batches, precisions in runs:
        models = build(arch, device)
        print(f"\narchitecture: hidden {arch.hidden}, {arch.heads} heads, {arch.depth_double} double + "
              f"{len(models[0].single_blocks)} single blocks, {args.context} context token(s); "
              f"{args.rounds} interleaved rounds of {args.reps} step(s)")
        print(agreement(*models, inputs(arch, 2, token_counts[0], args.context, device), arch))
        print(f"{'prec':>4} {'mode':>5} {'tokens':>6} {'batch':>5}  {'ours ms':>9} {'diff. ms':>9}  ratio [quartiles]"
              f"     {'ours MiB':>8} {'diff MiB':>8}  mem ratio")
        for precision in precisions:
            for mode in args.mode:
                for tokens in token_counts:
                    for batch in batches:
                        compare(arch, batch, tokens, args, device, precision, mode == "train", models)
        del models
    print(f"\n{load()}")


if __name__ == "__main__":
    main()
