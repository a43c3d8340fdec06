"""Closeness of float32 results to fixtures written on another machine.

The fixtures were written on an Intel Xeon. Another CPU runs other float32 kernels (AVX2 or AVX-512 code paths,
other reduction orders), so the same code gives other last bits, and a random 16-wide network amplifies them:
measured on an AMD EPYC, the code that wrote ``denoiser_reference.safetensors`` (commit 853594a) differed from its
own fixture by up to 9.4e-5 (relative norm, a small bias's gradient), the current code from that code on the same
machine by at most 1.6e-6; and the current code from ``legacy_heads.safetensors`` by at most 5.1e-6 (velocities).
An element-wise tolerance fails on the values near zero; the norm of the difference does not. Measured fault: RoPE
rotating the wrong way puts every gradient of ``denoiser_reference`` but one 3.3e-3 or more off (order 1 for the
q / k norm scales), and the legacy heads' loss 8.1e-4 off.
"""

import torch

RELATIVE = 5e-4


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``||got - expected|| / ||expected||``, in float32."""
    return ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)).item()


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str, relative: float = RELATIVE) -> None:
    """``||got - expected|| <= relative * ||expected||`` (same shape), or an error naming ``what``."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(expected.shape)}"
    error = relative_error(got, expected)
    assert error <= relative, f"{what}: relative error {error:.2e} > {relative:.0e}"
