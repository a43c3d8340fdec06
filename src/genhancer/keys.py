"""Every configuration key with its type, default and one line of help, from one source: ``config.py`` itself.

The help of a key is the trailing comment of its field line in ``config.py`` (read with ``tokenize``), or, for the
few fields whose line carries none, an entry of :data:`EXTRA_HELP`. ``genhancer config`` prints the table for a
resolved run configuration, and ``docs/config.md`` is :func:`reference_markdown` written out.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any

from .config import RunConfig

# Fields whose line in config.py has no trailing comment.
EXTRA_HELP = {
    "objective.mask_ratio_max": "discrete denoiser: upper end of the per-sample mask ratio range",
    "stage.lora_r": "LoRA rank of every linear layer of the vision encoder",
    "stage.lora_alpha": "LoRA scaling numerator (scale = alpha / r)",
    "stage.lora_dropout": "dropout on the LoRA branch's input",
    "optim.betas": "AdamW betas",
    "optim.weight_decay": "AdamW decoupled weight decay",
    "optim.eps": "AdamW epsilon",
    "optim.warmup_steps": "linear learning-rate warm-up over this many optimizer steps",
    "optim.grad_clip": "clip the gradient's global norm to this (0: no clipping)",
    "data.num_workers": "DataLoader worker processes (0: load in the training process)",
    "data.prefetch_factor": "micro-batches each worker prepares ahead",
    "train.output_dir": "run folder: config.yaml, metrics.jsonl, checkpoints/",
    "train.grad_accum": "micro-batches per optimizer step (global batch = batch_size x processes x grad_accum)",
    "train.epochs": "passes over the dataset when train.max_steps is unset",
    "train.seed": "seed of the head's initialisation, the data order, crops and every random draw",
    "train.log_every": "write metrics.jsonl / trackers every this many steps",
    "train.save_every": "checkpoint every this many steps (and at the end)",
    "train.keep_last": "checkpoints kept in the run folder",
    "train.resume": "continue from the run folder's newest good checkpoint (as --resume)",
    "train.trackers": "accelerate trackers, e.g. [tensorboard], [wandb] or [] (metrics.jsonl is always written)",
}


@dataclass(frozen=True)
class Key:
    """One configuration key: ``name`` is ``section.field``."""

    name: str
    type: str
    default: Any
    help: str


def _comments(cls: type) -> dict[str, str]:
    """Field name -> the trailing comment of its line in the class's source."""
    source = inspect.getsource(cls)
    out, line_start = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        row = tok.start[0]
        if tok.type == tokenize.NAME and row not in line_start and tok.start[1] == 4:
            line_start[row] = tok.string
        elif tok.type == tokenize.COMMENT and row in line_start:
            out[line_start[row]] = tok.string.lstrip("#").strip()
    return out


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if args:
        return f"{typing.get_origin(hint).__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if hint is type(None) else hint.__name__


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def config_keys() -> list[Key]:
    """Every key of :class:`RunConfig`, section by section in declaration order."""
    keys = []
    for section in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[section.name]
        hints, comments = typing.get_type_hints(cls), _comments(cls)
        for f in dataclasses.fields(cls):
            name = f"{section.name}.{f.name}"
            keys.append(Key(name, _type_name(hints[f.name]), _default(f),
                            comments.get(f.name) or EXTRA_HELP.get(name, "")))
    return keys


def sections() -> dict[str, str]:
    """Section name -> the first line of its dataclass's docstring."""
    hints = typing.get_type_hints(RunConfig)
    return {s.name: inspect.getdoc(hints[s.name]).splitlines()[0] for s in dataclasses.fields(RunConfig)}


def format_value(value: Any) -> str:
    """A value as it is written on the command line (YAML flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _value(cfg: RunConfig, name: str) -> Any:
    section, field = name.split(".")
    return getattr(getattr(cfg, section), field)


def config_table(cfg: RunConfig, changed_only: bool = False) -> str:
    """The resolved configuration as text: per section, ``key = value`` with type, default (when the value differs)
    and help."""
    lines, docs, last = [], sections(), None
    rows = [(k, _value(cfg, k.name)) for k in config_keys()]
    if changed_only:
        rows = [(k, v) for k, v in rows if format_value(v) != format_value(k.default)]
    width = max((len(k.name) + len(format_value(v)) for k, v in rows), default=0) + 3
    for key, value in rows:
        section = key.name.split(".")[0]
        if section != last:
            lines += ([""] if lines else []) + [f"# {section}: {docs[section]}"]
            last = section
        text = f"{key.name} = {format_value(value)}"
        note = f"{key.type}" + ("" if format_value(value) == format_value(key.default)
                                else f", default {format_value(key.default)}")
        lines.append(f"{text:<{width}}  # {note}. {key.help}")
    if not rows:
        lines.append("(every key has its default)")
    return "\n".join(lines)


def reference_markdown() -> str:
    """The key reference page of the docs (``docs/config.md``)."""
    out = ["# Configuration keys", "",
           "Every key of a run's configuration, generated from `src/genhancer/config.py` by "
           "`genhancer config --reference` (a test checks that this page is current). Set a key in a YAML recipe "
           "or on the command line as `section.key=value`; `genhancer config -c RECIPE KEY=VALUE...` prints the "
           "resolved value of every key.", ""]
    docs, keys = sections(), config_keys()
    for section, doc in docs.items():
        out += [f"## `{section}`: {doc}", "", "| key | type | default | what it does |", "| --- | --- | --- | --- |"]
        for k in keys:
            if k.name.startswith(section + "."):
                cells = (f"`{k.name}`", f"`{k.type}`", f"`{format_value(k.default)}`", k.help)
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")  # GFM: even in code
        out.append("")
    return "\n".join(out)
