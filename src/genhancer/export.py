"""Export: the enhanced encoder merged into a plain CLIP / SigLIP checkpoint in its source's format.

The export is a ``save_pretrained`` folder (safetensors) with the source's image-processor and tokenizer files
beside it, so ``CLIPModel.from_pretrained`` / ``SiglipModel.from_pretrained``, LLaVA's vision-tower loader and the
usual evaluation scripts load it unchanged. Only the vision tower differs from the source. ``vision_only`` writes
the vision tower alone (``CLIPVisionModelWithProjection`` / ``SiglipVisionModel``) with the image processor.
Every file is readable as the user's umask allows (as ``README.md`` is), and no local path is written into the
folder (``modelcard.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .backbones import build_backbone, resolve_source
from .checkpoint import load_checkpoint, load_run_config, resolve_checkpoint
from .enhancer import adapt_encoder, load_backbone_weights, merge_encoder
from .errors import ConfigError, WriteError
from .modelcard import base_name, hub_id, model_card, source_license
from .storage import WRITE_ERRORS, write_fix, write_problem

PROCESSOR_FILES = ("preprocessor_config.json",)
SIDE_FILES = (*PROCESSOR_FILES, "processor_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "spiece.model", "added_tokens.json")


def source_dir(source: str) -> Path | None:
    """A local folder holding the source's files: itself, or its snapshot in the Hugging Face cache."""
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:
        return None


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision side of a whole CLIPModel / SiglipModel as the model class downstream code loads alone."""
    from transformers import CLIPVisionModelWithProjection, SiglipVisionModel

    config = model.config.vision_config
    if model.config.model_type == "clip":
        config.projection_dim = model.config.projection_dim
        cls, parts = CLIPVisionModelWithProjection, ("vision_model", "visual_projection")
    else:
        cls, parts = SiglipVisionModel, ("vision_model",)
    with torch.device("meta"):
        tower = cls(config)
    for part in parts:  # transformers 5's SiglipVisionModel is the vision transformer itself
        getattr(tower, part, tower).load_state_dict(getattr(model, part).state_dict(), assign=True)
    return tower.eval()


def export_model(run: str | Path, out_dir: str | Path, vision_only: bool = False) -> Path:
    """Merge the run's encoder weights into its source model and write it to ``out_dir`` (new or empty)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not empty" if out.is_dir() else "is a file"
        raise ConfigError(f"export folder '{out}' {what}: choose a new folder or remove it")
    ckpt = resolve_checkpoint(run)
    cfg = load_run_config(ckpt)
    if cfg.stage.stage == "stage1":
        raise ConfigError("a stage-1 run leaves the encoder unchanged: export the stage-2 (or e2e) run instead")
    weights, _, state = load_checkpoint(ckpt)
    backbone = build_backbone(cfg.model)
    adapt_encoder(backbone, cfg.stage)
    load_backbone_weights(backbone, weights)
    model = merge_encoder(backbone).eval()
    family = model.config.model_type
    if vision_only:
        model = vision_tower(model)
    model.config._name_or_path = hub_id(cfg.model) or ""  # not the local folder it was loaded from

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        src = source_dir(resolve_source(cfg.model))
        copied = [name for name in (PROCESSOR_FILES if vision_only else SIDE_FILES)
                  if src is not None and (src / name).is_file()]
        for name in copied:
            shutil.copy2(src / name, tmp / name)
        card = model_card(cfg, state["step"], family, type(model).__name__, source_license(cfg.model, src),
                          vision_only, "preprocessor_config.json" in copied)
        (tmp / "README.md").write_text(card)
        (tmp / "genhancer.json").write_text(json.dumps(
            {"base_model": base_name(cfg.model), "base_model_hub_id": hub_id(cfg.model), "run": Path(run).name,
             "checkpoint": ckpt.name, "step": state["step"], "vision_only": vision_only,
             "genhancer_version": __version__}, indent=1))
        _readable_like(tmp / "README.md", tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except WRITE_ERRORS as e:  # safetensors reports a full disk as a SafetensorError, not an OSError
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"export to {out} not written: {write_problem(e)}; its partial files are removed. "
                         f"{write_fix(e, str(out.parent))} and export again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _readable_like(reference: Path, folder: Path) -> None:
    """Give every file of ``folder`` the permissions of ``reference`` (the umask's): some writers create 0600
    temporary files and rename them into place."""
    mode = reference.stat().st_mode & 0o777
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)
