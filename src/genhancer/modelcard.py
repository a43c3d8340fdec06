"""The model card (``README.md``) of an export, ready for the Hugging Face Hub, and the paper it cites.

The card starts with YAML metadata the Hub reads: ``base_model`` (the source's hub id, when it is known),
``license`` (the source's: its own card's, else the registered preset's), ``library_name``, ``pipeline_tag`` and
``tags``. Its body links the paper, shows how to load the model, lists the recipe and, once ``genhancer eval
compare`` has been run on the export, its results. No local path is written into it.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import yaml

from . import __version__
from .backbones import BACKBONES, resolve_source
from .config import ModelConfig, RunConfig

PAPER_TITLE = "GenHancer: Imperfect Generative Models are Secretly Strong Vision-Centric Enhancers"
PAPER_URL = "https://arxiv.org/abs/2503.19480"
BIBTEX = """@inproceedings{ma2025genhancer,
  title     = {GenHancer: Imperfect Generative Models are Secretly Strong Vision-Centric Enhancers},
  author    = {Ma, Shijie and Ge, Yuying and Wang, Teng and Guo, Yuxin and Ge, Yixiao and Shan, Ying},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2025},
  eprint    = {2503.19480},
  archivePrefix = {arXiv}
}"""
RESULTS_START, RESULTS_END = "<!-- genhancer eval compare -->", "<!-- /genhancer eval compare -->"
_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def hub_id(m: ModelConfig) -> str | None:
    """The hub id of the model a run started from: the one its source names (a hub id, or a Hugging Face cache
    path), else the preset's for a local folder of a preset's weights (of its architecture: checked at load time);
    None for any other local folder."""
    source = resolve_source(m)
    found = _CACHE_SNAPSHOT.search(Path(source).as_posix())
    if found:
        return f"{found.group(1)}/{found.group(2)}"
    if _HUB_ID.match(source) and not Path(source).exists():
        return source
    return BACKBONES[m.backbone].hub_id if m.backbone in BACKBONES else None


def base_name(m: ModelConfig) -> str:
    """How the card and genhancer.json name the source: its hub id, else its folder's name (never a local path)."""
    return hub_id(m) or Path(resolve_source(m).rstrip("/")).name


def front_matter(text: str) -> dict:
    """The YAML metadata block at the top of a model card ({} when there is none or it does not parse)."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        meta = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def source_license(m: ModelConfig, source_dir: Path | None) -> dict:
    """``license`` (and ``license_name`` / ``license_link`` for 'other') of the source: from its own model card,
    else from the registered preset."""
    card = source_dir / "README.md" if source_dir is not None else None
    meta = front_matter(card.read_text(errors="replace")) if card is not None and card.is_file() else {}
    if meta.get("license"):
        return {k: meta[k] for k in ("license", "license_name", "license_link") if k in meta}
    preset = BACKBONES.get(m.backbone)
    if preset is None or not preset.license or hub_id(m) != preset.hub_id:  # another model's weights
        return {}
    return {"license": preset.license}


def metadata(cfg: RunConfig, family: str, license_: dict, vision_only: bool) -> dict:
    meta = {}
    if hub_id(cfg.model):
        meta["base_model"] = hub_id(cfg.model)
    meta.update(license_)
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "image-feature-extraction" if vision_only else "zero-shot-image-classification"
    meta["tags"] = ["genhancer", family, "vision-encoder", "vision"]
    return meta


def usage(family: str, vision_only: bool) -> str:
    if vision_only:
        cls, out = (("CLIPVisionModelWithProjection", "image_embeds") if family == "clip"
                    else ("SiglipVisionModel", "pooler_output"))
        return f"""```python
from PIL import Image
from transformers import AutoImageProcessor, {cls}

model = {cls}.from_pretrained("MODEL")  # this folder, or its hub id once pushed
processor = AutoImageProcessor.from_pretrained("MODEL")
features = model(**processor(images=Image.open("image.jpg"), return_tensors="pt")).{out}
```"""
    cls = "CLIPModel" if family == "clip" else "SiglipModel"
    return f"""```python
from PIL import Image
from transformers import AutoProcessor, {cls}

model = {cls}.from_pretrained("MODEL")  # this folder, or its hub id once pushed
processor = AutoProcessor.from_pretrained("MODEL")
inputs = processor(text=["a photo of a cat", "a photo of a dog"], images=Image.open("image.jpg"),
                   return_tensors="pt", padding="max_length")
probs = model(**inputs).logits_per_image.softmax(dim=-1)
```

As the vision tower of a LLaVA-style model: `{cls.replace("Model", "VisionModel")}.from_pretrained("MODEL")` with the
image processor of the same folder, or export with `genhancer export --vision-only`."""


def recipe_table(cfg: RunConfig, step: int) -> str:
    s, m, o, t = cfg.stage, cfg.model, cfg.objective, cfg.train
    tuning = ("full fine-tuning" if s.finetune == "full"
              else f"LoRA r={s.lora_r}, alpha={s.lora_alpha}, dropout={s.lora_dropout} (merged)")
    head = "trained" if s.train_head or s.stage == "e2e" else "frozen"
    share = f", {o.uniform_share:g} of them uniform" if o.uniform_share else ""
    return f"""| | |
| --- | --- |
| recipe | {s.stage}, {tuning}, head {head} |
| denoiser | {m.denoiser} over latent `{m.latent}`, condition `{m.condition}` |
| objective | timesteps {o.timestep_sampling} (m={o.logit_normal_mean}, s={o.logit_normal_scale}){share} |
| optimiser | AdamW lr={cfg.lr}, batch {t.batch_size} x accumulation {t.grad_accum} per process, {t.precision} |
| data | `data.source={cfg.data.source}`, crops of scale {list(cfg.data.crop_scale)} |
| steps | {step} |
| exported | {datetime.date.today().isoformat()} with genhancer {__version__} |"""


def model_card(cfg: RunConfig, step: int, family: str, model_class: str, license_: dict, vision_only: bool,
               has_processor: bool) -> str:
    """The whole card: metadata, description, usage, recipe and citation."""
    what = "vision tower" if vision_only else "model"
    text_tower = "" if vision_only else " The text tower is the source's, unchanged."
    missing = "" if has_processor else (
        "\n> Warning: the source had no preprocessor_config.json; add one before loading with a processor.\n")
    licence = (f"Licence: `{license_['license']}`, carried over from the source." if license_
               else "Licence: not declared by the source; check its terms before sharing.")
    meta = yaml.safe_dump(metadata(cfg, family, license_, vision_only), sort_keys=False)
    return f"""---
{meta}---
# GenHancer-enhanced {base_name(cfg.model)}

The {what} of `{base_name(cfg.model)}` with its vision encoder post-trained by GenHancer
([{PAPER_TITLE}]({PAPER_URL}), Ma et al., ICCV 2025): a lightweight generative denoiser reconstructs each image
conditioned only on the encoder's global token, and the encoder learns the fine details it needs.{text_tower}
It loads as `{model_class}.from_pretrained(folder)`. {licence}
{missing}
## Usage

{usage(family, vision_only)}

## Training recipe

{recipe_table(cfg, step)}

## Citation

```bibtex
{BIBTEX}
```
"""


def results_section(report_md: str, base: str, labels: tuple[str, str]) -> str:
    """The tables of a ``genhancer eval compare`` report, for the card: without the report's title (it names local
    paths) and its figure (a file of the report folder)."""
    blocks = report_md.strip().split("\n\n")
    first = next((i for i, b in enumerate(blocks) if b.startswith("## ")), len(blocks))
    blocks = ["#" + b if b.startswith("## ") else b for b in blocks[first:] if not b.startswith("![")]
    base = Path(base.rstrip("/")).name if Path(base).exists() else base
    intro = (f"`genhancer eval compare` of this model ({labels[1]}) against `{base}` ({labels[0]}), "
             f"{datetime.date.today().isoformat()}:")
    return "\n\n".join([intro, *blocks])


def add_results(card_path: Path, results: str) -> None:
    """Put ``results`` (Markdown) into the card's evaluation section, replacing an earlier one."""
    text = card_path.read_text()
    section = f"{RESULTS_START}\n## Evaluation\n\n{results.strip()}\n{RESULTS_END}\n\n"
    if RESULTS_START in text and RESULTS_END in text:
        start, end = text.index(RESULTS_START), text.index(RESULTS_END) + len(RESULTS_END)
        text = text[:start] + section.rstrip("\n") + text[end:]
    else:
        text = text.replace("## Citation", section + "## Citation", 1)
    card_path.write_text(text)
