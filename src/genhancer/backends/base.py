"""The one interface through which the trainer's step drives a prepared model and optimizer."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from accelerate import Accelerator

from ..config import RunConfig


class Backend:
    """How a run's model and optimizer are prepared, take gradients and step, and save their optimizer state.

    A training step is ``for each micro-batch: with accumulate(last): loss = model(...); backward(loss)``, then
    ``step(loss_finite)``. :meth:`optimizer_state` and :meth:`load_optimizer_state` speak torch's AdamW
    ``state_dict`` (indices in the order of the trainable parameters), whatever the backend shards, so a
    checkpoint moves between backends and process counts.
    """

    def __init__(self, acc: Accelerator, cfg: RunConfig):
        self.acc, self.cfg = acc, cfg
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.nn.Parameter] = []

    def prepare(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        """Move ``module`` to the device and wrap it and ``optimizer``; returns the module to call."""
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        module.to(self.acc.device)
        self.model, self.optimizer = self._prepare(module, optimizer)
        return self.model

    def _prepare(self, module, optimizer) -> tuple:
        return self.acc.prepare(module, optimizer)

    def release(self) -> None:
        """Drop the wrapped module and optimizer (here and in the accelerator) and collect them, before the process
        group is destroyed. A DDP module's reducer holds the process group: were it the last holder, the group's
        destructor would run inside the reducer's, with the GIL held, and join gloo's worker thread while that
        thread waits for the GIL to free a finished collective's tensors (a hang at exit, seen about once in ten
        two-process runs on a loaded 2-core machine). Released first, the group goes with
        ``destroy_process_group``, whose destructor releases the GIL."""
        self.model = self.optimizer = None
        self.acc.free_memory()  # its references, then the garbage collector

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def accumulate(self, last: bool) -> AbstractContextManager:
        """The context of one micro-batch's forward and backward; ``last``: the one that ends the accumulation."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's mean loss."""
        raise NotImplementedError

    def step(self, loss_finite: bool) -> tuple[float, str | None]:
        """Clip and apply the accumulated gradient, then clear it; returns the gradient norm before clipping, and
        why the update was skipped, if it was ("loss": ``loss_finite=False``; "gradient": a non-finite norm;
        "update": an update that would make a weight non-finite). A skipped step leaves the weights and the
        optimizer state as they were."""
        raise NotImplementedError

    def optimizer_state(self) -> dict | None:
        """The optimizer's ``state_dict`` on the main process, None on the others. Collective."""
        raise NotImplementedError

    def load_optimizer_state(self, state: dict) -> None:
        """Load a ``state_dict`` written by :meth:`optimizer_state` of any backend. Collective."""
        raise NotImplementedError
