"""The ``genhancer`` command: a thin layer over the library. User mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import CheckpointError, ConfigError, TrainingError
from ..recipes import load_recipe, recipe_names, recipe_path
from . import eval as eval_cli
from . import miniworld as miniworld_cli
from . import perf as perf_cli
from . import vq as vq_cli


def cmd_train(args) -> None:
    from ..threads import set_cpu_threads
    from ..trainer import train

    cfg = load_recipe(args.config, args.overrides)
    set_cpu_threads(args.threads)
    run = train(cfg, resume=args.resume or cfg.train.resume)
    print(f"run folder: {run}")


def cmd_config(args) -> None:
    from ..config import detect_source, validate
    from ..keys import config_table, reference_markdown

    if args.reference:
        print(reference_markdown())
        return
    cfg = load_recipe(args.config, args.overrides, check=False)
    try:  # what `train` checks, reported after the table rather than instead of it
        detect_source(cfg.data)
        validate(cfg)
        problem = None
    except ConfigError as e:
        problem = e
    print(config_table(cfg, changed_only=args.changed))
    if problem:
        print(f"\n# not ready to train yet: {problem}")


def cmd_export(args) -> None:
    from ..export import export_model

    print(f"exported to {export_model(args.run, args.out, vision_only=args.vision_only)}")


def cmd_reconstruct(args) -> None:
    from ..images import folder_crops
    from ..reconstruct import load_enhancer, reconstruct, save_grid

    enh = load_enhancer(args.run, args.device)
    images = folder_crops(args.images, enh.image_size, limit=args.n)
    path = save_grid([images, reconstruct(enh, images, args.seed, args.steps)], args.out)
    print(f"wrote {path} (input | reconstruction, {len(images)} rows)")


def cmd_info(args) -> None:
    from ..info import describe

    print(describe(args.backbone, args.denoiser))


def cmd_recipes(args) -> None:
    if args.name is None:
        print("\n".join(recipe_names()))
        return
    print(recipe_path(args.name).read_text().rstrip())
    print(f"# every key, resolved: genhancer config -c {args.name}")


def build_parser() -> argparse.ArgumentParser:
    from ..backbones import BACKBONES
    from ..denoisers import DENOISERS

    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="genhancer", description="Post-train CLIP-family vision encoders with GenHancer (Ma et al., 2025): a "
        "lightweight denoiser reconstructs each image from the encoder's global token, and the encoder learns to "
        "see fine details.")
    parser.add_argument("--version", action="version", version=f"genhancer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keys_hint = ("Every key, its default and what it does: `genhancer config` (add -c RECIPE and KEY=VALUE to see a "
                 "resolved run) and docs/config.md. Your own CLIP/SigLIP: model.backbone=DIR; your own images: "
                 "data.path=DIR (a folder of images or .tar shards).")
    p = sub.add_parser("train", help="run one stage (stage1, stage2 or e2e) of GenHancer post-training",
                       epilog=keys_hint)
    p.add_argument("-c", "--config", help="YAML recipe: a path or a shipped recipe name (`genhancer recipes`)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's newest good checkpoint")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: $OMP_NUM_THREADS, else the CPUs not busy with other work; "
                        "CPU runs are bit-exact only at the same count)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.max_steps=100")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="print every config key of a recipe + overrides: value, type, default, help",
                       epilog="docs/config.md is `genhancer config --reference`.")
    p.add_argument("-c", "--config", help="YAML recipe: a path or a shipped recipe name (default: the defaults)")
    p.add_argument("--changed", action="store_true", help="only the keys whose value differs from the default")
    p.add_argument("--reference", action="store_true", help="the key reference page (Markdown) instead")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.max_steps=100")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("export", help="merge a stage-2 run into a CLIP/SigLIP checkpoint in the source's format")
    p.add_argument("run", help="run folder (its newest good checkpoint) or checkpoint folder")
    p.add_argument("out", help="new or empty output folder")
    p.add_argument("--vision-only", action="store_true",
                   help="write the vision tower alone (CLIPVisionModelWithProjection / SiglipVisionModel) with its "
                        "image processor, as LLaVA-style models load it")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("reconstruct", help="write an input | reconstruction grid from a trained run")
    p.add_argument("run", help="run folder or checkpoint folder")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--out", default="reconstruction.png")
    p.add_argument("-n", type=int, default=8, help="number of images")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("info", help="architectures and parameter counts of backbone and denoiser presets")
    p.add_argument("--backbone", nargs="*", choices=list(BACKBONES), help="default: all")
    p.add_argument("--denoiser", nargs="*", choices=list(DENOISERS), help="default: all")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("recipes", help="list the shipped YAML recipes, or show one")
    p.add_argument("name", nargs="?", help="a recipe to print (default: list them all)")
    p.set_defaults(func=cmd_recipes)

    for area in (eval_cli, miniworld_cli, vq_cli, perf_cli):
        area.add_commands(sub)
    return parser


def prepare_process() -> None:
    """What every ``genhancer`` process sets up before its work (the benchmark scripts too, to measure what the CLI
    runs): without a GPU, freed host memory kept for the next step instead of faulted in again (``hostmem.py``);
    known third-party noise filtered (``quiet.py``)."""
    from ..hostmem import keep_freed_memory_without_gpu
    from ..quiet import silence_third_party

    keep_freed_memory_without_gpu()
    silence_third_party()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..quiet import out_of_memory

    prepare_process()
    try:
        args.func(args)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `genhancer config | head`: the reader has gone, as for any Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as e:  # after TrainingError, a RuntimeError too
        if not out_of_memory(e):
            raise
        fix = ("lower train.batch_size (raise train.grad_accum to keep the global batch) or pick a smaller "
               "model.denoiser (`genhancer info` lists sizes); `genhancer bench` finds the largest batch that fits" if args.command == "train" else "lower --batch-size")
        print(f"error: out of memory ({_first_line(e)}): {fix}", file=sys.stderr)
        return 2
    return 0


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


if __name__ == "__main__":
    sys.exit(main())
