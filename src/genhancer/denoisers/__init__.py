"""Denoiser networks and their presets.

Every preset is one JSON file ``configs/denoisers/<name>.json``: ``{"family": ..., <every field of the family's
architecture dataclass>}``. ``DENOISERS`` maps preset names (the CLI's choices) to :class:`DenoiserPreset`. A new
family is one module (see ``base.py``) added to ``FAMILIES``; a new preset is one JSON file.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from types import ModuleType

from . import flux, perceiver

FAMILIES: dict[str, ModuleType] = {"flux": flux, "perceiver": perceiver}


@dataclasses.dataclass(frozen=True)
class DenoiserPreset:
    """A registered denoiser: its family module and its architecture."""

    name: str
    family: str
    arch: object

    @property
    def module(self) -> ModuleType:
        return FAMILIES[self.family]


def _arch(family: ModuleType, fields: dict):
    """The family's architecture dataclass from JSON values (lists become the tuples the dataclass declares)."""
    return family.ARCH(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _load_presets() -> dict[str, DenoiserPreset]:
    presets = {}
    for entry in resources.files("genhancer").joinpath("configs", "denoisers").iterdir():
        if entry.name.endswith(".json"):
            fields = json.loads(entry.read_text())
            family = fields.pop("family")
            presets[entry.name[:-5]] = DenoiserPreset(entry.name[:-5], family, _arch(FAMILIES[family], fields))
    return dict(sorted(presets.items()))


DENOISERS = _load_presets()
