"""The bound that clears AdamW's update without computing it is sound: whenever it says finite, torch's AdamW step
gives finite parameters. It clears the updates of ordinary training, so the costly exact check runs only off it;
and the exact check agrees with torch's step on the CPU."""

import math

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from genhancer.backends.plain import adamw_update_is_finite, update_bound_holds

# from float32 subnormals to within a factor of 30 of its top (nearer, torch's own lerp and the exact check round
# differently: a documented limit of the exact check, not of the bound)
magnitude = st.floats(-45, 37).map(lambda e: 10.0**e)


def tensor(scale: float, seed: int, nonnegative: bool = False) -> torch.Tensor:
    x = torch.randn(8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    x = x.abs() if nonnegative else x
    return x.clamp(-torch.finfo(torch.float32).max, torch.finfo(torch.float32).max).float()


def optimizer(lr, betas, eps, decay, p, g, m, v, steps) -> torch.optim.AdamW:
    """AdamW over one parameter in the given state: ``steps`` steps taken (moments m, v), gradient g."""
    param = torch.nn.Parameter(p.clone())
    param.grad = g.clone()
    opt = torch.optim.AdamW([param], lr=lr, betas=betas, eps=eps, weight_decay=decay)
    if steps:
        opt.state[param] = {"step": torch.tensor(float(steps)), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    return opt


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lr=st.one_of(st.just(0.0), st.floats(-9, 40).map(lambda e: 10.0**e)),
       betas=st.tuples(st.floats(0, 0.999), st.floats(0, 0.9999)),
       eps=st.one_of(st.just(0.0), st.floats(-40, -1).map(lambda e: 10.0**e)),
       decay=st.one_of(st.just(0.0), st.floats(-6, 4).map(lambda e: 10.0**e)),
       scales=st.tuples(magnitude, magnitude, magnitude, magnitude), steps=st.integers(0, 3), seed=st.integers(0, 99))
# the corners: a large first moment over a tiny second one and eps (m / denominator overflows); a step size beyond
# float32 (torch raises); weights at the top of the range
@example(lr=1e-3, betas=(0.9, 0.999), eps=1e-20, decay=0.0, scales=(1.0, 1e-10, 1e37, 1e-40), steps=1, seed=0)
@example(lr=1e36, betas=(0.998, 0.0), eps=1e-8, decay=0.0, scales=(1.0, 1e-45, 1e-45, 1e-45), steps=0, seed=0)
@example(lr=5e36, betas=(0.0, 0.0), eps=0.1, decay=0.0, scales=(1e39, 1.0, 1.0, 1.0), steps=1, seed=0)
def test_the_bound_never_clears_an_update_that_is_not_finite(lr, betas, eps, decay, scales, steps, seed):
    p, g, m, v = (tensor(s, seed + i, nonnegative=i == 3) for i, s in enumerate(scales))  # v >= 0, as AdamW keeps it
    opt = optimizer(lr, betas, eps, decay, p, g, m, v, steps)
    group = opt.param_groups[0]
    cleared = update_bound_holds(group, group["params"], opt.state)
    says_finite = adamw_update_is_finite(opt)
    try:
        opt.step()
        finite = bool(torch.isfinite(group["params"][0]).all())
    except RuntimeError:  # a step size or decay factor beyond float32: torch raises rather than step
        finite = False
    if cleared:
        assert finite, "the bound cleared an update that made a parameter non-finite"
    assert says_finite == finite  # the exact check rounds as torch's AdamW on the CPU, subnormals included


def test_ordinary_training_is_cleared_by_the_bound():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for _ in range(3):
        model(torch.randn(8, 16)).square().mean().backward()
        group = opt.param_groups[0]
        assert update_bound_holds(group, [p for p in group["params"] if p.grad is not None], opt.state)
        opt.step()
        opt.zero_grad()


def test_eps_zero_is_left_to_the_exact_check():
    p, zero = torch.ones(8), torch.zeros(8)
    opt = optimizer(1e-3, (0.9, 0.999), 0.0, 0.0, p, zero, zero, zero, steps=1)  # 0 / 0 in every element
    group = opt.param_groups[0]
    assert not update_bound_holds(group, group["params"], opt.state)
    assert not adamw_update_is_finite(opt)
    opt.step()
    assert math.isnan(group["params"][0].detach()[0])
