"""DeepSpeed ZeRO-1/2 under accelerate, as the paper trained: optimizer states (and, for stage 2, gradients)
sharded across processes, everything else as in the DDP path.

The run config stays the only source of truth: micro-batch, accumulation, clipping and precision are written into
DeepSpeed's config here, whatever the accelerate config says. Weights stay fp32 and bf16 runs autocast (DeepSpeed's
``torch_autocast``), as DDP does, so the module always holds the exact fp32 weights. Checkpoints stay in the
trainer's own format: the sharded AdamW state is gathered into torch's per-parameter ``state_dict`` on save and
scattered back on resume, so a run can move between DeepSpeed and DDP, or to another process count.
"""

from __future__ import annotations

import importlib.util
import math
import os
from contextlib import contextmanager

import torch
from accelerate.utils import InitProcessGroupKwargs

from ..config import RunConfig
from ..errors import ConfigError
from .base import Backend

_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def requested() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_kwargs(cfg: RunConfig) -> dict:
    """Accelerator arguments for a DeepSpeed launch (see the module docstring for why precision is "no")."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("the accelerate config asks for DeepSpeed, which is not installed: pip install deepspeed "
                          "(or genhancer[deepspeed]), or launch with configs/accelerate/ddp-8gpu.yaml")
    if cfg.train.precision == "fp16":
        raise ConfigError("train.precision=fp16 is not supported with DeepSpeed: use train.precision=bf16 (the "
                          "paper's) or fp32")
    kwargs = {"mixed_precision": "no", "gradient_accumulation_steps": cfg.train.grad_accum}
    if not torch.cuda.is_available():  # accelerate picks no process-group backend for DeepSpeed on CPU
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        skip_shared_memory_op()
    return kwargs


def skip_shared_memory_op() -> None:
    """Keep DeepSpeed's CPU communication from compiling its shared-memory all-reduce op when it starts.

    DeepSpeed builds that C++ extension (``deepspeed_shm_comm``) on its first start in an environment (40 s on two
    cores, and a compiler needed), yet only its tensor-parallel inference calls it; ZeRO training communicates
    through the process group. DeepSpeed reads the op's availability from ``deepspeed.ops.__compatible_ops__``, a
    dict it keeps for edits like this one.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def configure(acc, cfg: RunConfig) -> str:
    """Check the ZeRO stage and write the run's batching, clipping and precision into DeepSpeed's config;
    returns a line that says what is sharded."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage")
    if stage not in (1, 2):
        raise ConfigError(f"DeepSpeed ZeRO stage {stage} is not supported: use zero_stage 1 or 2 "
                          "(configs/accelerate/deepspeed-zero2-8gpu.yaml)")
    for what in ("offload_optimizer", "offload_param"):
        if (zero.get(what) or {}).get("device", "none") not in ("none", None):
            raise ConfigError(f"DeepSpeed {what} is not supported: set its device to none in the accelerate config")
    for what in ("optimizer", "scheduler"):
        if what in ds:
            raise ConfigError(f"the DeepSpeed config has a '{what}' section: remove it (the trainer's AdamW and "
                              "warm-up, set by optim.*, are used)")
    t = cfg.train
    ds.update(train_micro_batch_size_per_gpu=t.batch_size, gradient_accumulation_steps=t.grad_accum,
              train_batch_size=t.batch_size * t.grad_accum * acc.num_processes,
              gradient_clipping=float(cfg.optim.grad_clip), fp16={"enabled": False}, bf16={"enabled": False},
              torch_autocast={"enabled": t.precision == "bf16", "dtype": "bfloat16"})
    sharded = "optimizer states and gradients" if stage == 2 else "optimizer states"
    return f"DeepSpeed ZeRO-{stage}: {sharded} sharded over {acc.num_processes} processes"


@contextmanager
def scalars_as_vectors(module: torch.nn.Module):
    """Give 0-dim parameters (CLIP's ``logit_scale``) one dimension while the engine is built: DeepSpeed
    broadcasts every parameter viewed as bytes, which torch refuses for 0-dim tensors."""
    scalars = [p for p in module.parameters() if p.dim() == 0]
    for p in scalars:
        p.data = p.data.reshape(1)
    try:
        yield
    finally:
        for p in scalars:
            p.data = p.data.reshape(())


def gather_optimizer_state(opt, params: list[torch.nn.Parameter], keep: bool = True) -> dict | None:
    """AdamW's state of ``params`` as torch's ``state_dict`` (indices in ``params`` order). Collective: every
    process must call it; only those with ``keep`` hold the result (the others return None, so that 8 processes
    do not each hold a full CPU copy). ``opt`` is the prepared optimizer (ZeRO's partitions under accelerate's
    wrapper)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = opt.optimizer.optimizer  # torch's AdamW, stepping this process's flat fp32 partition
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(params)))}
              for g in base.param_groups[:1]]
    steps = [s["step"] for s in base.state.values() if "step" in s]
    if not steps:  # nothing stepped yet
        return {"state": {}, "param_groups": groups} if keep else None
    state = {}
    for i, p in enumerate(params):
        full = {key: safe_get_full_optimizer_state(p, key) for key in _STATE_KEYS}  # one all-reduce per tensor
        if keep:
            state[i] = {"step": steps[0].detach().cpu().clone(), **{k: v.cpu() for k, v in full.items()}}
    return {"state": state, "param_groups": groups} if keep else None


def load_optimizer_state(opt, params: list[torch.nn.Parameter], saved: dict) -> None:
    """Scatter a ``state_dict`` written by :func:`gather_optimizer_state` (or by a plain AdamW over the same
    parameters) into ZeRO's partitions; collective."""
    from deepspeed.utils import safe_set_full_optimizer_state

    state = saved.get("state", {})
    if not state:
        return
    state = {int(k): v for k, v in state.items()}
    if sorted(state) != list(range(len(params))):
        raise ValueError(f"the checkpoint holds optimizer state for {len(state)} tensors, this run trains "
                         f"{len(params)}")
    for i, p in enumerate(params):
        for key in _STATE_KEYS:
            if tuple(state[i][key].shape) != tuple(p.shape):
                raise ValueError(f"optimizer state {key} of tensor {i} has shape {tuple(state[i][key].shape)}, "
                                 f"the parameter {tuple(p.shape)}")
    base = opt.optimizer.optimizer
    if not base.state:  # AdamW creates its state in its first step: take one that changes nothing (zero lr)
        lrs = [g["lr"] for g in base.param_groups]
        for g in base.param_groups:
            g["lr"] = 0.0
            for flat in g["params"]:
                flat.grad = torch.zeros_like(flat)
        base.step()
        for g, lr in zip(base.param_groups, lrs):
            g["lr"] = lr
            for flat in g["params"]:
                flat.grad = None
        opt.optimizer._lazy_init_hp_params_optimizer_state()  # what ZeRO's own first step does next
    for s in base.state.values():
        s["step"].copy_(state[0]["step"])
    for i, p in enumerate(params):
        for key in _STATE_KEYS:
            safe_set_full_optimizer_state(p, state[i][key].to(p.device, torch.float32), key)


class ZeroBackend(Backend):
    """DeepSpeed's engine: it autocasts, divides by ``grad_accum``, reduces into shards, clips and steps, or
    skips a step whose gradient norm is not finite."""

    def __init__(self, acc, cfg: RunConfig):
        super().__init__(acc, cfg)
        acc.print(configure(acc, cfg))

    def _prepare(self, module, optimizer) -> tuple:
        with scalars_as_vectors(module):
            return self.acc.prepare(module, optimizer)

    @contextmanager
    def accumulate(self, last: bool):
        self.model.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def step(self, loss_finite: bool) -> tuple[float, str | None]:
        self.model.step()
        norm = self.model.get_global_grad_norm()
        norm = math.inf if norm is None or self.optimizer.step_was_skipped else float(norm)
        self.optimizer.zero_grad(set_to_none=True)
        # the engine decided on its own overflow check; a non-finite update is caught when the weights are saved
        return norm, "loss" if not loss_finite else "gradient" if not math.isfinite(norm) else None

    def optimizer_state(self) -> dict | None:
        return gather_optimizer_state(self.optimizer, self.params, keep=self.acc.is_main_process)

    def load_optimizer_state(self, state: dict) -> None:
        load_optimizer_state(self.optimizer, self.params, state)
