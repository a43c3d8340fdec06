"""A CLIP or SigLIP model with its image processor and tokenizer, embedding images and texts for evaluation.

Models load from a ``save_pretrained`` directory (an exported GenHancer model is one) or from a hub id already in
the local cache; nothing is downloaded. Texts are tokenised as the MMVP-VLM reference evaluation does: CLIP padded
to 77 tokens with truncation, SigLIP padded to its tokenizer's max length; only ``input_ids`` reach the text tower
(no attention mask), again as in the reference. CLIP pools at the end-of-text token under a causal mask, so padding
cannot change its result; SigLIP was trained on padded text without a mask and pools the last position.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel, SiglipModel

from genhancer.errors import ConfigError
from genhancer.images import BadSample, decode_image

FAMILIES = {"clip": CLIPModel, "siglip": SiglipModel}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CLIP_CONTEXT = 77  # the reference evaluation's max_length for CLIP tokenizers
RUN_MARKERS = ("config.yaml", "state.json", "checkpoints")  # what a `genhancer train` run or checkpoint folder holds


def check_not_a_run(name_or_path: str) -> None:
    """Refuse a training run's folder where a model is expected, naming the export that makes one."""
    folder = Path(name_or_path)
    if not (folder / "config.json").is_file() and any((folder / n).exists() for n in RUN_MARKERS):
        raise ConfigError(f"{name_or_path!r} is a genhancer run folder, not a model: export it first "
                          f"(genhancer export {name_or_path} OUT) and evaluate OUT")


def processor_size(processor) -> int | None:
    """The side of the square images an image processor outputs (None when it does not make them square)."""
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = size or getattr(processor, "size", None)
    height, width = (size.get(k) if isinstance(size, dict) else getattr(size, k, None) for k in ("height", "width"))
    return height if height is not None and height == width else None


def read_image(source, where: str = "") -> Image.Image:
    """Decode one image (a path or a binary file object) fully, as RGB (``images.decode_image``, as training does).

    ``where`` names the image in errors (default: the path), e.g. ``"Questions.csv line 5 (Question ID 4): <path>"``.
    """
    where = where or str(source)
    try:
        return decode_image(source.read() if hasattr(source, "read") else Path(source).read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{where}: image not found") from None
    except (OSError, BadSample) as err:
        raise ConfigError(f"{where}: cannot read image ({err})") from None


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output with ``pooler_output`` in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class EvalModel:
    """A dual-encoder under evaluation: ``family`` is ``"clip"`` or ``"siglip"``."""

    model: torch.nn.Module
    image_processor: object
    tokenizer: object
    family: str
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, L)`` input ids: L = 77 for CLIP, the tokenizer's max length for SigLIP."""
        if self.family == "clip":
            max_length = CLIP_CONTEXT
        else:
            max_length = self.tokenizer.model_max_length
            if max_length > 1_000_000:  # tokenizer saved without a max length: fall back to the model's context
                max_length = self.model.config.text_config.max_position_embeddings
        encoded = self.tokenizer(
            list(texts), padding="max_length", max_length=max_length, truncation=True,
            return_attention_mask=False,  # never used: building it costs as much as the ids
            return_tensors="np",  # torch.tensor on the token lists holds the GIL longer (7 against 1.5 ms, 270 texts)
        )
        return torch.from_numpy(encoded["input_ids"])

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(N, 3, H, W)`` processed images; each image is processed on its own, so batching changes nothing."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` -> ``(N, D)`` projected, unnormalised image embeddings (fp32 on the model's device)."""
        out = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))
        return _features(out).float()

    @torch.no_grad()
    def embed_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(N, L)`` -> ``(N, D)`` projected, unnormalised text embeddings (fp32 on the model's device)."""
        if self.family == "clip":
            input_ids = input_ids[:, : int(self._clip_pooled_positions(input_ids).max()) + 1]
        return _features(self.model.get_text_features(input_ids=input_ids.to(self.device))).float()

    def _clip_pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(N,)`` the position CLIP's text tower pools (its end-of-text token), found as transformers does.

        Under CLIP's causal mask no later token reaches that position, so the padding columns after the batch's
        last pooled position are dropped: the same embeddings (up to float rounding) for a fraction of the work.
        """
        eos = self.model.config.text_config.eos_token_id
        if eos == 2:  # legacy configs: the end-of-text token has the highest id
            return input_ids.argmax(dim=-1)
        return (input_ids == eos).int().argmax(dim=-1)

    def embed_texts(self, texts: Sequence[str], batch_size: int, desc: str = "texts") -> torch.Tensor:
        """``(N, D)`` text embeddings computed ``batch_size`` texts at a time."""
        parts = []
        for chunk in _progress(batches(texts, batch_size), len(texts), batch_size, desc):
            parts.append(self.embed_ids(self.tokenize(chunk)))
        return torch.cat(parts)

    def embed_images(self, load, count: int, batch_size: int, desc: str = "images") -> torch.Tensor:
        """``(count, D)`` image embeddings; ``load(i)`` returns image i as PIL, decoded batch by batch."""
        parts = []
        for chunk in _progress(batches(range(count), batch_size), count, batch_size, desc):
            parts.append(self.embed_pixels(self.pixel_values([load(i) for i in chunk])))
        return torch.cat(parts)

    def normalize(self, embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalise the last dim with the arithmetic of the model's own forward."""
        if self.family == "clip":
            return embeds / embeds.pow(2).sum(dim=-1, keepdim=True).pow(0.5)
        return embeds / embeds.norm(p=2, dim=-1, keepdim=True)

    @torch.no_grad()
    def logits_per_text(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """``(..., T, D)`` x ``(..., I, D)`` -> ``(..., T, I)``: the model forward's ``logits_per_text``."""
        text, image = self.normalize(text_embeds), self.normalize(image_embeds)
        logits = torch.matmul(text, image.transpose(-1, -2)) * self.model.logit_scale.float().exp()
        if self.family == "siglip":
            logits = logits + self.model.logit_bias.float()
        return logits


def _progress(iterable, count: int, batch_size: int, desc: str):
    """A tqdm bar over the batches of ``count`` items, shown only on a terminal."""
    return tqdm(iterable, total=-(-count // batch_size), desc=desc, unit="batch", disable=None, leave=False)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


def load_model(name_or_path: str, device: str = "auto", dtype: str = "fp32") -> EvalModel:
    """Load a CLIPModel / SiglipModel with its image processor and tokenizer, offline, in eval mode.

    ``name_or_path``: a ``save_pretrained`` directory or a hub id already in the local cache.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    check_not_a_run(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        what = "is not a transformers model folder" if (Path(name_or_path) / "config.json").is_file() else "not found"
        raise ConfigError(
            f"model {name_or_path!r} {what}: give a save_pretrained CLIP/SigLIP directory or a hub id already "
            "in the local cache (nothing is downloaded)"
        ) from None
    family = config.model_type
    if family not in FAMILIES:
        raise ConfigError(f"model {name_or_path!r} is a {family!r} model; evaluation needs a CLIP or SigLIP model")
    try:
        image_processor = AutoImageProcessor.from_pretrained(name_or_path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError, ImportError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model {name_or_path!r} lacks a usable image processor or tokenizer ({first_line}); "
            "save them next to the weights (save_pretrained of the processor and tokenizer)"
        ) from None
    made, takes = processor_size(image_processor), config.vision_config.image_size
    if made is not None and made != takes:
        raise ConfigError(f"model {name_or_path!r}: its image processor makes {made}px images but its vision tower "
                          f"takes {takes}px: set size / crop_size to {takes} in its preprocessor_config.json (or copy "
                          "the source model's)")
    vocab_size = config.text_config.vocab_size
    if len(tokenizer) < vocab_size // 2:  # transformers 5 builds an empty tokenizer when its files are missing
        raise ConfigError(
            f"model {name_or_path!r}: its tokenizer has {len(tokenizer)} tokens for a text tower of {vocab_size}; "
            "save the model's tokenizer files next to the weights"
        )
    try:
        model = FAMILIES[family].from_pretrained(name_or_path, local_files_only=True)
    except OSError as err:
        first_line = str(err).strip().splitlines()[0]
        raise ConfigError(f"model {name_or_path!r}: cannot load its weights ({first_line})") from None
    model = model.to(resolve_device(device), DTYPES[dtype]).eval()
    return EvalModel(model, image_processor, tokenizer, family, str(name_or_path))
