"""Export: the enhanced encoder merged into a plain CLIP / SigLIP checkpoint in its source's format.

The export is a ``save_pretrained`` folder (safetensors) with the source's image-processor and tokenizer files
beside it, so ``CLIPModel.from_pretrained`` / ``SiglipModel.from_pretrained``, LLaVA's vision-tower loader and the
usual evaluation scripts load it unchanged. Only the vision tower differs from the source.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

from . import __version__
from .backbones import build_backbone, resolve_source
from .checkpoint import load_checkpoint, load_run_config, resolve_checkpoint
from .config import RunConfig
from .enhancer import adapt_encoder, load_backbone_weights, merge_encoder
from .errors import ConfigError, WriteError
from .storage import WRITE_ERRORS, write_fix, write_problem

SIDE_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
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


def export_model(run: str | Path, out_dir: str | Path) -> Path:
    """Merge the run's encoder weights into its source model and write it to ``out_dir`` (which must be new or empty)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export folder '{out}' is not empty: choose a new folder or remove it")
    ckpt = resolve_checkpoint(run)
    cfg = load_run_config(ckpt)
    if cfg.stage.stage == "stage1":
        raise ConfigError("a stage-1 run leaves the encoder unchanged: export the stage-2 (or e2e) run instead")
    weights, _, state = load_checkpoint(ckpt)
    backbone = build_backbone(cfg.model)
    adapt_encoder(backbone, cfg.stage)
    load_backbone_weights(backbone, weights)
    model = merge_encoder(backbone).eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        src = source_dir(resolve_source(cfg.model))
        copied = []
        for name in SIDE_FILES:
            if src is not None and (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
                copied.append(name)
        (tmp / "README.md").write_text(model_card(cfg, state, ckpt, copied, type(model).__name__))
        (tmp / "genhancer.json").write_text(json.dumps(
            {"base_model": resolve_source(cfg.model), "checkpoint": str(ckpt), "step": state["step"],
             "genhancer_version": __version__}, indent=1))
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


def model_card(cfg: RunConfig, state: dict, ckpt: Path, processor_files: list[str], model_class: str) -> str:
    s, m = cfg.stage, cfg.model
    tuning = "full fine-tuning" if s.finetune == "full" else f"LoRA r={s.lora_r}, alpha={s.lora_alpha}, dropout={s.lora_dropout} (merged)"
    missing = "" if "preprocessor_config.json" in processor_files else (
        "\n> Warning: the source had no preprocessor_config.json; add one before loading with a processor.\n")
    return f"""---
base_model: {resolve_source(m)}
library_name: transformers
tags: [genhancer, clip, vision-encoder]
---
# GenHancer-enhanced {m.backbone}

The vision tower of `{resolve_source(m)}` post-trained with GenHancer (Ma et al., 2025): a lightweight
generative denoiser reconstructs each image conditioned only on the encoder's global token. The text tower is
the source's, unchanged. Load it as the source loads: `{model_class}.from_pretrained(folder)`.
{missing}
| | |
| --- | --- |
| recipe | {s.stage}, {tuning}, head {'trained' if s.train_head or s.stage == 'e2e' else 'frozen'} |
| denoiser | {m.denoiser} over latent `{m.latent}`, condition `{m.condition}` |
| objective | timesteps {cfg.objective.timestep_sampling} (m={cfg.objective.logit_normal_mean}, s={cfg.objective.logit_normal_scale}) |
| optimiser | AdamW lr={cfg.lr}, batch {cfg.train.batch_size} x accumulation {cfg.train.grad_accum} per process, {cfg.train.precision} |
| steps | {state['step']} (checkpoint `{ckpt}`) |
| exported | {datetime.date.today().isoformat()} with genhancer {__version__} |
"""
