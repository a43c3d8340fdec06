"""Training backends: how the trainer's step runs under each accelerate launch.

* :class:`~genhancer.backends.plain.PlainBackend`: one process or DDP (``plain.py``);
* :class:`~genhancer.backends.zero.ZeroBackend`: DeepSpeed ZeRO-1/2 (``zero.py``).

Both implement :class:`~genhancer.backends.base.Backend`; :func:`build_backend` picks the one the launch asks for.
"""

from __future__ import annotations

import importlib.util

from accelerate import Accelerator

from ..config import RunConfig
from ..errors import ConfigError
from . import zero
from .base import Backend
from .plain import PlainBackend


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """The accelerator of a run launched by ``genhancer train`` (plain, or under ``accelerate launch``)."""
    t = cfg.train
    kwargs = {"mixed_precision": "no" if t.precision == "fp32" else t.precision}
    if zero.requested():
        kwargs = zero.accelerator_kwargs(cfg)
    return Accelerator(log_with=[x for x in t.trackers if tracker_available(x)] or None, project_dir=t.output_dir,
                       **kwargs)


def build_backend(acc: Accelerator, cfg: RunConfig) -> Backend:
    kind = acc.distributed_type.name
    if kind == "FSDP":
        raise ConfigError("accelerate's FSDP is not supported by the trainer: shard with DeepSpeed ZeRO-2 "
                          "(configs/accelerate/deepspeed-zero2-8gpu.yaml) or launch with DDP (ddp-8gpu.yaml)")
    return zero.ZeroBackend(acc, cfg) if kind == "DEEPSPEED" else PlainBackend(acc, cfg)


def tracker_available(name: str) -> bool:
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name, name)
    return importlib.util.find_spec(module) is not None
