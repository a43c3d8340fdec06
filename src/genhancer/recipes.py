"""The YAML recipes shipped in ``genhancer/recipes/``, by name (``genhancer recipes`` lists them)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .config import RunConfig, load_config
from .errors import ConfigError


def recipe_names() -> list[str]:
    root = resources.files("genhancer").joinpath("recipes")
    names = []
    for entry in root.iterdir():
        if entry.is_dir():
            names += [f"{entry.name}/{e.name[:-5]}" for e in entry.iterdir() if e.name.endswith(".yaml")]
        elif entry.name.endswith(".yaml"):
            names.append(entry.name[:-5])
    return sorted(names)


def recipe_path(name: str) -> Path:
    """A shipped recipe by name, or a YAML path."""
    if Path(name).is_file():
        return Path(name)
    if name in recipe_names():
        return Path(str(resources.files("genhancer").joinpath("recipes", f"{name}.yaml")))
    raise ConfigError(f"recipe '{name}' is neither a file nor a shipped recipe: see `genhancer recipes`")


def load_recipe(name: str | None, overrides: list[str] = (), base: dict | None = None,
                check: bool = True) -> RunConfig:
    """The run config of a recipe (a shipped name or a YAML path; None: the defaults) with ``overrides``; ``check``:
    validated and ready to run (else only parsed and type-checked)."""
    return load_config(recipe_path(name) if name else None, overrides, base, check)
