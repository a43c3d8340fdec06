"""``genhancer miniworld``: the offline miniature world (scenes, tiny base CLIP, benchmarks, probes, demo, ablations)."""

from __future__ import annotations

import argparse
from pathlib import Path

from genhancer.errors import ConfigError
from genhancer.evaluation import write_json


def add_commands(sub) -> None:
    """Register ``miniworld`` with sub-commands generate, pretrain, benchmark, probe, incentive, demo and ablate."""
    parser = sub.add_parser("miniworld", help="the offline miniature world: generate, pretrain, benchmark, probe, "
                                              "incentive, demo")
    commands = parser.add_subparsers(dest="miniworld_command",
                                     metavar="{generate,pretrain,benchmark,probe,incentive,demo,ablate}")
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument("--threads", type=int, default=1,
                         help="torch CPU threads (default 1: the documented numbers; another count changes them "
                              "slightly, and torch's default was 9x slower on a busy 2-core machine)")
    commands.required = True

    p = commands.add_parser("generate", help="render a folder of scene images (+ labels.jsonl with captions)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--first-seed", type=int, default=0, help="seed of the first scene (default 0: training split)")
    p.add_argument("--size", type=int, default=64, help="image resolution in pixels (default 64)")
    p.add_argument("--p", type=float, default=None,
                   help="probability that a caption mentions each attribute (default: per-attribute rates, "
                        "scenes.MENTION)")
    p.set_defaults(func=run_generate)

    p = commands.add_parser("pretrain", parents=[threads], help="pretrain the tiny base CLIP contrastively on the world")
    p.add_argument("--out", required=True, help="output folder (a save_pretrained CLIP folder)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-images", type=int, default=10000)
    p.add_argument("--p", type=float, default=None,
                   help="probability that a caption mentions each attribute (default: per-attribute rates, "
                        "scenes.MENTION)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_pretrain)

    p = commands.add_parser("benchmark", help="write the MMVP-VLM-format benchmarks from held-out seeds")
    p.add_argument("--out", required=True, help="output folder: <out>/mmvp and <out>/mmvp-large")
    p.add_argument("--parts", type=int, default=7, help="15-pair-per-category parts of the large version (default 7)")
    p.add_argument("--first-seed", type=int, default=None,
                   help="draw the standard version from this seed on and the large one from 1,000,000 above it, "
                        "instead of the held-out splits (seeds >= 50,000,000 are in no split: a fresh draw)")
    p.set_defaults(func=run_benchmark)

    p = commands.add_parser("probe", parents=[threads], help="text-free probes (linear probe, blind pairs) of a model's global embedding")
    p.add_argument("--model", default=None, help="save_pretrained CLIP folder (default: the shipped base)")
    p.add_argument("--out", default=None, help="write probes.json here")
    p.add_argument("--first-seed", type=int, default=None,
                   help="draw the probe scenes from this seed on instead of the probe split (seeds >= 50,000,000 are "
                        "in no split: a fresh draw, to check a result on scenes never seen)")
    p.set_defaults(func=run_probe)

    p = commands.add_parser("incentive", parents=[threads],
                            help="what reconstruction pays for each attribute: swap costs of an oracle condition, "
                                 "and the encoder's condition against zeros and other scenes")
    p.add_argument("--encoder", default=None, help="CLIP folder whose condition is also measured (default: the "
                                                   "shipped base; 'none' to skip)")
    p.add_argument("--steps", type=int, default=None, help="stage-1 steps (default: the demo's)")
    p.add_argument("--out", default=None, help="write incentive.json and incentive.md here")
    p.add_argument("--fast", action="store_true", help="a tiny budget (smoke test; numbers meaningless)")
    p.set_defaults(func=run_incentive)

    p = commands.add_parser("demo", parents=[threads], help="end to end: world, stage 1 + 2 on the shipped base, export, evaluate, report")
    p.add_argument("--out", default="miniworld-demo", help="report folder (default: miniworld-demo)")
    p.add_argument("--fast", action="store_true", help="a few steps of everything (tests; well under a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo)

    p = commands.add_parser("ablate", parents=[threads], help="an ablation of the paper in miniature: table + plot over seeds")
    p.add_argument("study", help="timesteps, condition, stages, finetune, size, denoiser or curve")
    p.add_argument("--seeds", type=int, default=3, help="how many training seeds (default 3)")
    p.add_argument("--seed-from", type=int, default=0,
                   help="the first training seed (default 0): split one study's seeds over several processes")
    p.add_argument("--out", default=None, help="output folder (default: miniworld-ablate-<study>)")
    p.add_argument("--fast", action="store_true", help="a few steps per run (smoke test)")
    p.add_argument("--variants", nargs="+", default=(), metavar="NAME",
                   help="run only these variants of the study (quoted names, as in its table; default: all)")
    p.add_argument("--split", choices=("held-out", "val"), default="held-out",
                   help="score on the held-out seeds (default: numbers to report) or on the val seeds (to choose a "
                        "recipe without looking at held-out scores)")
    p.set_defaults(func=run_ablate)


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"--{name} must be > 0, got {value}")


def _non_negative(name: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise ConfigError(f"--{name} must be >= 0, got {value}")


def _pin(args) -> None:
    from genhancer.miniworld import pin_threads

    _positive("threads", args.threads)
    pin_threads(args.threads)


def run_generate(args) -> None:
    from genhancer.miniworld.scenes import write_folder

    _positive("num", args.num)
    _positive("size", args.size)
    _non_negative("first-seed", args.first_seed)
    if args.p is not None and not 0 <= args.p <= 1:
        raise ConfigError(f"--p must be in [0, 1], got {args.p}")
    out = write_folder(args.out, args.num, args.first_seed, args.size, args.p)
    print(f"wrote {args.num} images to {out}")


def run_pretrain(args) -> None:
    from genhancer.miniworld.pretrain import pretrain

    for name in ("steps", "batch_size", "num_images", "lr"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.p is not None and not 0 <= args.p <= 1:
        raise ConfigError(f"--p must be in [0, 1], got {args.p}")
    _pin(args)
    if args.batch_size > args.num_images:
        raise ConfigError(f"--batch-size {args.batch_size} exceeds --num-images {args.num_images}")
    out = pretrain(args.out, steps=args.steps, batch_size=args.batch_size, num_images=args.num_images, p=args.p,
                   lr=args.lr, seed=args.seed)
    print(f"saved the pretrained base CLIP to {out}")


def run_benchmark(args) -> None:
    from genhancer.miniworld.benchmark import write_benchmarks

    _positive("parts", args.parts)
    _non_negative("first-seed", args.first_seed)
    out = Path(args.out)
    write_benchmarks(out, args.parts, args.first_seed)
    print(f"wrote {out / 'mmvp'} (genhancer eval mmvp --benchmark {out / 'mmvp'}) and {out / 'mmvp-large'}")


def run_probe(args) -> None:
    from genhancer.miniworld.base import shipped_base
    from genhancer.miniworld.probes import run_probes

    model = args.model or str(shipped_base())
    if not (Path(model) / "config.json").is_file():
        raise ConfigError(f"--model {model}: not a save_pretrained CLIP folder (no config.json)")
    _non_negative("first-seed", args.first_seed)
    _pin(args)
    result = run_probes([model], first_seed=args.first_seed)[0]
    for name, table in result.items():
        print(name + ": " + ", ".join(f"{k} {v:.1f}" for k, v in table.items()))
    if args.out:
        print(f"wrote {write_json(Path(args.out) / 'probes.json', result)}")


def run_incentive(args) -> None:
    from genhancer.miniworld.base import shipped_base
    from genhancer.miniworld.incentive import DEMO, FAST, measure, table

    encoder = None if args.encoder == "none" else args.encoder or str(shipped_base())
    if encoder is not None and not (Path(encoder) / "config.json").is_file():
        raise ConfigError(f"--encoder {encoder}: not a save_pretrained CLIP folder (no config.json); "
                          "give one, or 'none' to measure the oracle only")
    recipe = FAST if args.fast else DEMO
    if args.steps is not None:
        _positive("steps", args.steps)
        recipe = recipe.with_(steps=args.steps)
    _pin(args)
    result = measure(recipe, encoder=encoder)
    print(table(result))
    if args.out:
        write_json(Path(args.out) / "incentive.json", result)
        (Path(args.out) / "incentive.md").write_text(table(result) + "\n")
        print(f"wrote {Path(args.out) / 'incentive.json'}")


def run_demo(args) -> None:
    from genhancer.miniworld.demo import demo

    _pin(args)

    demo(args.out, fast=args.fast, seed=args.seed)


def run_ablate(args) -> None:
    from genhancer.miniworld.ablate import STUDIES, ablate

    if args.study not in STUDIES:
        raise ConfigError(f"unknown study '{args.study}': choose one of {', '.join(STUDIES)}")
    _positive("seeds", args.seeds)
    _non_negative("seed-from", args.seed_from)
    _pin(args)
    ablate(args.study, seeds=args.seeds, out=args.out or f"miniworld-ablate-{args.study}", fast=args.fast,
           variants=tuple(args.variants), split=args.split, seed_from=args.seed_from)
