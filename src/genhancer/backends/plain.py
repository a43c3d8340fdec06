"""One process or DDP under accelerate: autocast, no gradient all-reduce until the last micro-batch, clipping,
and fp16 loss scaling."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch

from .base import Backend


class PlainBackend(Backend):
    """accelerate's own path: ``acc.backward`` of the loss over ``grad_accum``, ``clip_grad_norm_``, the update."""

    @contextmanager
    def accumulate(self, last: bool):
        with nullcontext() if last else self.acc.no_sync(self.model), self.acc.autocast():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss / self.cfg.train.grad_accum)

    def step(self, loss_finite: bool) -> tuple[float, str | None]:
        # max_norm=inf measures the norm without clipping (optim.grad_clip=0)
        norm = float(self.acc.clip_grad_norm_(self.params, self.cfg.optim.grad_clip or math.inf))
        skipped = "loss" if not loss_finite else "gradient" if not math.isfinite(norm) else None
        if skipped is None and not adamw_update_is_finite(getattr(self.optimizer, "optimizer", self.optimizer)):
            skipped = "update"
        if skipped is None:
            self.optimizer.step()
        elif self.acc.scaler is not None:  # fp16: lower the loss scale, re-arm unscale_ for the next step
            self.acc.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, skipped

    def optimizer_state(self) -> dict | None:
        return self.optimizer.state_dict() if self.acc.is_main_process else None

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


@torch.no_grad()
def adamw_update_is_finite(opt: torch.optim.Optimizer) -> bool:
    """Whether AdamW's next step leaves every parameter finite, worked out aside, one parameter at a time, without
    changing anything. A finite gradient can still give a non-finite update (``optim.eps=0`` with a zero second
    moment is 0/0; a huge lr overflows), and once applied it could only be undone from a copy of the weights and
    both moments, three times the trainable parameters in memory. Same formulas as torch's AdamW (the rounding
    differs, which can only matter within a factor of 2 of the float range)."""
    finite = []
    for group in opt.param_groups:
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state, g = opt.state.get(p, {}), p.grad.float()
            n = float(state["step"]) + 1 if "step" in state else 1.0
            m = state["exp_avg"] * beta1 + g * (1 - beta1) if state else g * (1 - beta1)
            v = state["exp_avg_sq"] * beta2 + g * g * (1 - beta2) if state else g * g * (1 - beta2)
            step = (lr / (1 - beta1 ** n)) * m / (v.sqrt() / math.sqrt(1 - beta2 ** n) + eps)
            finite.append(torch.isfinite(p * (1 - lr * decay) - step).all())
    return bool(torch.stack(finite).all()) if finite else True
