"""CLI commands of the VQ tokenizer: ``train-vq`` (the tiny offline tokenizer) and ``convert-vqgan``."""

from __future__ import annotations

from ..errors import ConfigError


def add_commands(sub) -> None:
    """Register ``train-vq`` and ``convert-vqgan``; each handler is ``args.func(args) -> exit code``."""
    p = sub.add_parser("train-vq", help="train a small VQ tokenizer on your own images (offline discrete runs)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (searched recursively)")
    src.add_argument("--synthetic", type=int, metavar="N", help="N generated images of colored rectangles")
    p.add_argument("--out", required=True, help="output folder (a diffusers VQModel: use as model.latent_path)")
    p.add_argument("--config", default="tiny", help="VQModel config: tiny, f16-1024, f16-16384 or a JSON file")
    p.add_argument("--size", type=int, default=32, help="image side; must be divisible by the downsampling factor")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.set_defaults(func=_train_vq)

    p = sub.add_parser("convert-vqgan", help="convert a taming-transformers VQGAN checkpoint to a diffusers VQModel")
    p.add_argument("checkpoint", help="taming .ckpt (Lightning, with state_dict), .pt or .safetensors")
    p.add_argument("--out", required=True, help="output folder (use as model.latent_path)")
    p.add_argument("--expect", choices=["f16-1024", "f16-16384"],
                   help="fail unless the checkpoint is this shipped architecture")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary pickled objects in the checkpoint (only for files you trust)")
    p.set_defaults(func=_convert_vqgan)


def _train_vq(args) -> int:
    import torch

    from .. import vq

    for name in ("size", "steps", "batch_size", "synthetic"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.images:
        images = vq.folder_images(args.images, args.size)
    else:
        images = vq.synthetic_images(args.synthetic, args.size, torch.Generator().manual_seed(args.seed))
    space, losses = vq.train_vq(images, args.out, args.config, steps=args.steps, batch_size=args.batch_size,
                                lr=args.lr, seed=args.seed, log=print,
                                device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"saved VQ model ({space.codebook_size} codes, downsampling {space.downsample}) to {args.out}; "
          f"final loss {losses[-1]:.4f}")
    return 0


def _convert_vqgan(args) -> int:
    from .. import vq

    model = vq.convert_vqgan(args.checkpoint, args.out, expect=args.expect, trust_pickle=args.trust_pickle)
    cfg = model.config
    print(f"saved VQModel ({cfg.num_vq_embeddings} codes, downsampling {2 ** (len(cfg.block_out_channels) - 1)}) "
          f"to {args.out}")
    return 0
