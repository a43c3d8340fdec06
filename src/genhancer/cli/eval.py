"""``genhancer eval``: MMVP-VLM, zero-shot classification, retrieval, and a base-vs-enhanced report."""

from __future__ import annotations

import argparse
from pathlib import Path

from genhancer.errors import ConfigError
from genhancer.evaluation import write_json


def add_commands(sub) -> None:
    """Register ``eval`` with sub-commands ``mmvp``, ``zeroshot``, ``retrieval`` and ``compare``."""
    parser = sub.add_parser("eval", help="evaluate CLIP/SigLIP models: MMVP-VLM, zero-shot, retrieval, compare")
    commands = parser.add_subparsers(dest="eval_command", metavar="{mmvp,zeroshot,retrieval,compare}")
    commands.required = True

    p = commands.add_parser("mmvp", help="MMVP-VLM by the benchmark's reference protocol (batched)")
    p.add_argument("--model", required=True, help="save_pretrained CLIP/SigLIP directory or cached hub id")
    p.add_argument("--benchmark", required=True, help="MMVP-VLM folder holding Questions.csv and the image folder")
    p.add_argument("--pairwise", action="store_true",
                   help="run the reference's pair-by-pair loop instead of batches (same scores, slower)")
    p.add_argument("--recheck-band", type=float, default=None,
                   help="batched: recompute pair by pair any pair with a probability this close to 0.5, where "
                        "float rounding could flip a pick (default 1e-5; 0 disables)")
    _common(p, "eval-mmvp")
    p.set_defaults(func=run_mmvp)

    p = commands.add_parser("zeroshot", help="zero-shot classification on an image folder (one folder per class)")
    p.add_argument("--model", required=True, help="save_pretrained CLIP/SigLIP directory or cached hub id")
    _zeroshot_options(p, "--data", "image folder with one sub-folder per class")
    _common(p, "eval-zeroshot")
    p.set_defaults(func=run_zeroshot)

    p = commands.add_parser("retrieval", help="image<->text recall@1/5/10 on image-caption pairs")
    p.add_argument("--model", required=True, help="save_pretrained CLIP/SigLIP directory or cached hub id")
    _retrieval_options(p, "--data", "CSV/TSV of image,caption rows, or webdataset shards (.tar, glob, {a..b})")
    _common(p, "eval-retrieval")
    p.set_defaults(func=run_retrieval)

    p = commands.add_parser("compare", help="run evaluations on a base and an enhanced model and write a report")
    p.add_argument("base", help="base model: save_pretrained directory or cached hub id")
    p.add_argument("enhanced", help="enhanced model (e.g. a GenHancer export)")
    p.add_argument("--mmvp", help="MMVP-VLM benchmark folder")
    _zeroshot_options(p, "--zeroshot", "[NAME=]image folder of a classification dataset", repeat=True)
    _retrieval_options(p, "--retrieval", "[NAME=]CSV or shards of a retrieval dataset", repeat=True)
    p.add_argument("--labels", nargs=2, default=["Original", "Ours"], metavar=("BASE", "ENHANCED"),
                   help="row names in the report (default: Original Ours)")
    _common(p, "eval-compare")
    p.set_defaults(func=run_compare)


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--out", default=out, help=f"output folder (default: {out})")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="model dtype (default fp32)")
    p.add_argument("--batch-size", type=int, default=32, help="images / texts per forward (default 32)")


def _zeroshot_options(p: argparse.ArgumentParser, flag: str, help_: str, repeat: bool = False) -> None:
    p.add_argument(flag, required=not repeat, action="append" if repeat else "store", default=[] if repeat else None,
                   help=help_ + (" (repeatable)" if repeat else ""))
    p.add_argument("--classnames", help="class names: JSON {folder: name} or one name per line in folder order")
    p.add_argument("--templates", default="ensemble",
                   help="prompt templates: ensemble (CLIP's 7), single ('a photo of a {}.'), or a file, one per line")


def _retrieval_options(p: argparse.ArgumentParser, flag: str, help_: str, repeat: bool = False) -> None:
    p.add_argument(flag, required=not repeat, action="append" if repeat else "store", default=[] if repeat else None,
                   help=help_ + (" (repeatable)" if repeat else ""))
    p.add_argument("--image-root", help="folder the CSV's image paths are relative to (default: the CSV's folder)")


def _check_batch(args) -> None:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")


def run_mmvp(args) -> None:
    from genhancer.evaluation import mmvp
    from genhancer.evaluation.models import load_model

    _check_batch(args)
    mmvp.load_benchmark(args.benchmark)  # fail on a bad benchmark before loading the model
    model = load_model(args.model, args.device, args.dtype)
    if args.pairwise:
        result = mmvp.evaluate_pairwise(model, args.benchmark)
    else:
        band = mmvp.RECHECK_BAND if args.recheck_band is None else args.recheck_band
        result = mmvp.evaluate(model, args.benchmark, args.batch_size, band)
    meta = {"model": args.model, "benchmark": args.benchmark, "protocol": "pairwise" if args.pairwise else "batched"}
    csv_path, json_path = mmvp.write_results(result, args.out, meta)
    for category, value in result.scores.items():
        print(f"{category:<36} {value:6.1f}")
    print(f"{result.correct_pairs}/{len(result.rows)} pairs correct; wrote {csv_path} and {json_path}")


def run_zeroshot(args) -> None:
    from genhancer.evaluation import zeroshot
    from genhancer.evaluation.models import load_model

    _check_batch(args)
    templates = zeroshot.resolve_templates(args.templates)
    zeroshot.load_image_folder(args.data, args.classnames)  # fail on a bad dataset before loading the model
    model = load_model(args.model, args.device, args.dtype)
    result = zeroshot.evaluate(model, args.data, templates, args.classnames, args.batch_size)
    path = write_json(Path(args.out) / "zeroshot.json", {"model": args.model, "data": args.data, **result})
    print(f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  ({result['num_images']} images, "
          f"{result['num_classes']} classes); wrote {path}")  # fmt: skip


def run_retrieval(args) -> None:
    from genhancer.evaluation import retrieval
    from genhancer.evaluation.models import load_model

    _check_batch(args)
    retrieval.load_pairs(args.data, args.image_root)  # fail on bad pairs before loading the model
    model = load_model(args.model, args.device, args.dtype)
    result = retrieval.evaluate(model, args.data, args.image_root, args.batch_size)
    path = write_json(Path(args.out) / "retrieval.json", {"model": args.model, "data": args.data, **result})
    for direction in ("image_to_text", "text_to_image"):
        print(direction, "  ".join(f"{k} {v:.2f}" for k, v in result[direction].items()))
    print(f"{result['num_images']} images, {result['num_texts']} captions; wrote {path}")


def _named(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after its file or folder) -> {name: path}."""
    named = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name:
            name, path = Path(spec.rstrip("/")).stem, spec
        if name in named:
            raise ConfigError(f"dataset name {name!r} given twice; name them NAME=PATH")
        named[name] = path
    return named


def run_compare(args) -> None:
    from genhancer.evaluation import report, zeroshot
    from genhancer.evaluation.models import check_not_a_run

    _check_batch(args)
    if not (args.mmvp or args.zeroshot or args.retrieval):
        raise ConfigError("nothing to compare: give --mmvp DIR and/or --zeroshot DIR and/or --retrieval DATA")
    plan = report.Comparison(
        mmvp=args.mmvp, zeroshot=_named(args.zeroshot), retrieval=_named(args.retrieval),
        templates=zeroshot.resolve_templates(args.templates), classnames=args.classnames,
        image_root=args.image_root, batch_size=args.batch_size,
    )  # fmt: skip
    for model in (args.base, args.enhanced):
        check_not_a_run(model)
    plan.check()  # fail on bad data before spending time on the first model
    report.compare(args.base, args.enhanced, plan, args.out, tuple(args.labels), args.device, args.dtype)
    text = (Path(args.out) / "report.md").read_text()
    print(text)
    card = Path(args.enhanced) / "README.md"
    if (Path(args.enhanced) / "genhancer.json").is_file() and card.is_file():  # a genhancer export
        from genhancer.modelcard import add_results, results_section

        add_results(card, results_section(text, args.base, tuple(args.labels)))
        print(f"added these results to the model card {card}")
