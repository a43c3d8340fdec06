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

    def step(self, loss_finite: bool) -> float:
        # max_norm=inf measures the norm without clipping (optim.grad_clip=0)
        norm = float(self.acc.clip_grad_norm_(self.params, self.cfg.optim.grad_clip or math.inf))
        if loss_finite and math.isfinite(norm):
            self.optimizer.step()
        elif self.acc.scaler is not None:  # fp16: lower the loss scale, re-arm unscale_ for the next step
            self.acc.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def optimizer_state(self) -> dict | None:
        return self.optimizer.state_dict() if self.acc.is_main_process else None

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
