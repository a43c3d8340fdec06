"""The ``genhancer`` command: a thin layer over the library. User mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import sys

from ..errors import CheckpointError, ConfigError, TrainingError
from ..recipes import load_recipe, recipe_names
from . import eval as eval_cli
from . import miniworld as miniworld_cli
from . import perf as perf_cli
from . import vq as vq_cli


def cmd_train(args) -> None:
    from ..trainer import train

    cfg = load_recipe(args.config, args.overrides)
    run = train(cfg, resume=args.resume or cfg.train.resume)
    print(f"run folder: {run}")


def cmd_export(args) -> None:
    from ..export import export_model

    print(f"exported to {export_model(args.run, args.out)}")


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
    print("\n".join(recipe_names()))


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

    p = sub.add_parser("train", help="run one stage (stage1, stage2 or e2e) of GenHancer post-training")
    p.add_argument("-c", "--config", help="YAML recipe: a path or a shipped recipe name (`genhancer recipes`)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's newest good checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.max_steps=100")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="merge a stage-2 run into a CLIP/SigLIP checkpoint in the source's format")
    p.add_argument("run", help="run folder (its newest good checkpoint) or checkpoint folder")
    p.add_argument("out", help="new or empty output folder")
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

    p = sub.add_parser("recipes", help="list the shipped YAML recipes")
    p.set_defaults(func=cmd_recipes)

    for area in (eval_cli, miniworld_cli, vq_cli, perf_cli):
        area.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars drown the run's own progress
    try:
        args.func(args)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
