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
    """Whether AdamW's next step leaves every parameter finite, without changing anything. A finite gradient can
    still give a non-finite update (``optim.eps=0`` with a zero second moment is 0/0; a huge lr overflows), and once
    applied it could only be undone from a copy of the weights and both moments, three times the trainable
    parameters in memory. Each parameter group is first cleared by a bound (:func:`update_bound_holds`: three
    max-abs reductions); only a group the bound cannot clear has its update worked out aside (:func:`exact_check`).
    """
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if params and not update_bound_holds(group, params, opt.state) and not exact_check(group, params, opt.state):
            return False
    return True


def update_bound_holds(group: dict, params: list[torch.Tensor], state: dict) -> bool:
    """A sufficient condition for AdamW's update of ``params`` to be finite, from max |p|, |g| and |m| alone.

    With eps > 0 and betas in [0, 1), the denominator sqrt(v_hat) + eps is at least eps, so every element of the
    update is at most ``lr / (1 - beta1^n) * (beta1 |m| + (1 - beta1) |g|) / eps`` in size, whatever the second
    moment (v >= 0 and finite: it is a running mean of squares of the finite gradients this check let through, and
    a v that overflows to inf only makes the update 0). The bound holds when that quotient, the new parameter and
    the scalars AdamW multiplies by stay below half the float range (room for the rounding of the ops that compute
    them; a scalar beyond the range makes torch raise instead of step). Measured on the miniworld's head (CPU, one
    thread, profiled): the exact check cost 1.4x the optimizer step, this 0.4x.
    """
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if not (eps > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and math.isfinite(lr) and math.isfinite(decay)):
        return False
    moments = [state[p]["exp_avg"] for p in params if "exp_avg" in state.get(p, {})]
    if len(moments) not in (0, len(params)):
        return False  # some parameters with state, some without: not worth a bound
    p_max, g_max = max_abs([p.detach() for p in params]), max_abs([p.grad for p in params])
    m_max = max_abs(moments) if moments else [0.0] * len(params)  # first step: no first moment yet
    for p, pm, gm, mm in zip(params, p_max, g_max, m_max):
        n = float(state[p]["step"]) + 1 if "step" in state.get(p, {}) else 1.0
        limit = torch.finfo(p.dtype).max / 2
        step_size, shrink = lr / (1 - beta1**n), abs(1 - lr * decay)  # scalars AdamW casts to the parameter's dtype
        quotient = (beta1 * mm + (1 - beta1) * gm) / eps  # bounds |m_next| / denominator
        new = pm * shrink + step_size * quotient
        # |g|, |m| < max / 4 keeps AdamW's lerp (g - m) in range; comparisons are False for nan and inf
        if not all(x < limit for x in (step_size, shrink, quotient, new, 2 * gm, 2 * mm)):
            return False
    return True


def exact_check(group: dict, params: list[torch.Tensor], state: dict) -> bool:
    """The update of ``params`` worked out aside, one parameter at a time, with the ops of torch's single-tensor
    AdamW in its order (lerp, mul + addcmul, sqrt / bias correction + eps, addcdiv), so that on that path (the CPU
    default) it rounds alike, down to the subnormals: whether every new value is finite. The foreach and fused
    kernels (GPU) round differently in the last bits, which matters only at the edges of the float range."""
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    finite = []
    for p in params:
        st, g = state.get(p, {}), p.grad
        n = float(st["step"]) + 1 if "step" in st else 1.0
        m = st["exp_avg"] if st else torch.zeros_like(p)
        v = st["exp_avg_sq"] if st else torch.zeros_like(p)
        m, v = m.lerp(g, 1 - beta1), v.mul(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2**n) ** 0.5).add_(eps)
        try:
            new = p.detach().mul(1 - lr * decay).addcdiv_(m, denom, value=-(lr / (1 - beta1**n)))
        except RuntimeError:  # a step size or decay factor beyond the parameter's dtype: AdamW would raise
            return False
        finite.append(torch.isfinite(new).all())
    return bool(torch.stack(finite).all())  # one device sync for the group


def max_abs(tensors: list[torch.Tensor]) -> list[float]:
    """max |x| of each tensor (nan if it holds one), with one device sync: on GPU a fused multi-tensor kernel; on
    CPU one min-and-max pass per tensor, which measured 3-10x faster there than the norm kernel."""
    if tensors[0].device.type != "cpu":
        values = torch._foreach_norm(tensors, math.inf)
    else:
        values = []
        for x in tensors:
            lo, hi = torch.aminmax(x) if x.numel() else (x.new_zeros(()), x.new_zeros(()))
            values.append(torch.maximum(-lo, hi))
    return torch.stack([v.double() for v in values]).tolist()
