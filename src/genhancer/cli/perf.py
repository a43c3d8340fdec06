"""CLI commands of the performance area: ``bench`` (time the training step) and ``cache`` (encode a dataset once)."""

from __future__ import annotations

from ..errors import ConfigError


def add_commands(sub) -> None:
    """Register ``bench`` and ``cache``; handlers raise ConfigError for user mistakes."""
    p = sub.add_parser("bench", help="time the real training step: s/it, images/s, peak memory, params, FLOPs, MFU")
    p.add_argument("-c", "--config", help="YAML recipe (path or shipped name); default: the --preset alone")
    p.add_argument("--preset", default="tiny", help="tiny (CPU-sized miniature) or paper (CLIP ViT-L/14 + FLUX-like "
                                                    "n=2, random weights); applied before the recipe and overrides")
    p.add_argument("--stage", choices=["stage1", "stage2", "e2e"], default=None, help="default: the config's")
    p.add_argument("--batch-size", type=int, default=None, help="per-device batch (default: the config's)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--resolution", type=int, default=None, help="the backbone's architecture at this input side "
                                                                "(random weights), e.g. 224, 336, 384")
    p.add_argument("--cache", action="store_true", help="build a cache of the images first and train from it")
    p.add_argument("--views", type=int, default=1, help="crops per image in the cache")
    p.add_argument("--attention", choices=["auto", "math"], default="auto",
                   help="auto: fused SDPA kernels (flash on GPU); math: the unfused reference, for comparison")
    p.add_argument("--real-data", action="store_true", help="read data.source / data.path (disk, decoding) instead "
                                                            "of images generated in memory")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak for the MFU "
                                                                   "(default: known GPUs)")
    p.add_argument("--json", metavar="PATH", help="append the result as one JSON line to PATH")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.compile=true")
    p.set_defaults(func=_bench)

    p = sub.add_parser("cache", help="encode a dataset once through the frozen encoders (latents, stage-1 "
                                     "condition tokens) into sharded safetensors; train with data.source=cache")
    p.add_argument("-c", "--config", help="YAML recipe of the run that will use the cache (path or shipped name)")
    p.add_argument("--out", required=True, help="new or empty output folder (then: data.source=cache data.path=OUT)")
    p.add_argument("--views", type=int, default=1, help="K crops per image: the crops of epochs 0..K-1")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--shard-size", type=int, default=4096, help="items per safetensors shard")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="storage of latents and condition tokens (bfloat16 halves the disk)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.path=shards/")
    p.set_defaults(func=_cache)


def _bench(args) -> int:
    from ..bench import append_json, bench_recipe, table

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.views < 1:
        raise ConfigError(f"--views must be >= 1, got {args.views}")
    record = bench_recipe(args.config, args.overrides, preset=args.preset, stage=args.stage,
                          batch_size=args.batch_size, resolution=args.resolution, real_data=args.real_data,
                          warmup=args.warmup, steps=args.steps, cache=args.cache, views=args.views, cpu=args.cpu,
                          attention=args.attention, peak_tflops=args.peak_tflops)
    print(table(record))
    if args.json:
        append_json(record, args.json)
        print(f"appended to {args.json}")
    return 0


def _cache(args) -> int:
    import torch

    from ..cache import build_cache
    from ..recipes import load_recipe

    cfg = load_recipe(args.config, args.overrides)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.train.seed)  # random encoders (model.random_init) drawn as the run's trainer draws them
    out = build_cache(cfg, args.out, views=args.views, batch_size=args.batch_size, device=device, dtype=args.dtype,
                      shard_size=args.shard_size)
    print(f"cache written to {out}: train with data.source=cache data.path={out}")
    return 0
