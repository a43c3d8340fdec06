"""Registry of denoiser presets. Each family module exposes ``PRESETS`` (name -> architecture dataclass) and
``build(arch, cond_dim, latent) -> GenerativeHead``; a new family is one module added to ``_FAMILIES``."""

from __future__ import annotations

import dataclasses
import difflib

from ..config import ConfigError
from . import flux, perceiver
from .base import GenerativeHead

_FAMILIES = (flux, perceiver)
DENOISERS = {name: (family, arch) for family in _FAMILIES for name, arch in family.PRESETS.items()}


def denoiser_arch(name: str, overrides: dict | None = None):
    """The architecture dataclass of preset ``name`` with ``overrides`` applied (unknown fields rejected)."""
    if name not in DENOISERS:
        close = difflib.get_close_matches(name, DENOISERS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(sorted(DENOISERS))}"
        raise ConfigError(f"unknown denoiser preset '{name}': {hint}")
    _, arch = DENOISERS[name]
    fields = {f.name for f in dataclasses.fields(arch)}
    for key in overrides or {}:
        if key not in fields:
            raise ConfigError(f"unknown key 'model.denoiser_arch.{key}' for denoiser '{name}': "
                              f"valid keys: {', '.join(sorted(fields))}")
    return dataclasses.replace(arch, **(overrides or {}))


def build_head(name: str, overrides: dict | None, cond_dim: int, latent) -> GenerativeHead:
    """Projector + denoiser of preset ``name`` for condition tokens of width ``cond_dim`` over ``latent``."""
    family, _ = DENOISERS.get(name, (None, None))
    arch = denoiser_arch(name, overrides)
    head = family.build(arch, cond_dim, latent)
    if head.latent_kind != latent.kind:
        raise ConfigError(f"denoiser '{name}' needs a {head.latent_kind} latent space but model.latent is "
                          f"{latent.kind}: use a {'VQ' if head.latent_kind == 'discrete' else 'continuous'} latent")
    return head


def family_of(name: str) -> str:
    return DENOISERS[name][0].__name__.rsplit(".", 1)[-1]
