"""The tiny base CLIP: a transformers ``CLIPModel`` with a tiny config, an offline ``CLIPTokenizer`` over the
world's closed vocabulary, and a ``CLIPImageProcessor``, saved together so the folder loads with the standard
``from_pretrained`` calls like a real CLIP checkpoint.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path

from typing import TYPE_CHECKING

from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor

from genhancer.miniworld.scenes import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TEXT_LEN = 77  # CLIP's context: the MMVP-VLM protocol pads to it
_PRETOKENIZE = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def shipped_base() -> Path:
    """Directory of the pretrained base CLIP shipped with the package."""
    return Path(str(resources.files("genhancer") / "assets" / "miniworld-clip"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table of byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return dict(zip(range(256), chars))


def bpe_files(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """CLIP-style ``vocab.json`` / ``merges.txt`` contents that encode each of ``words`` as one token.

    The base vocabulary is CLIP's 512 byte-level symbols (each with and without ``</w>``), so any text
    tokenizes; merges are learnt by plain BPE on the closed word list until every word is a single symbol.
    """
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    pieces = sorted({p for w in words for p in _PRETOKENIZE.findall(w.lower())})
    seqs = [tuple(p[:-1]) + (p[-1] + "</w>",) for p in pieces]
    merges: list[str] = []
    while True:
        pairs = Counter(pair for s in seqs for pair in zip(s, s[1:]))
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        vocab_list.append(a + b)
        seqs = [_merge(s, a, b) for s in seqs]
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def _merge(seq: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return tuple(out)


def save_tokenizer(out_dir: Path) -> CLIPTokenizer:
    """Write vocab.json + merges.txt for the world's vocabulary and save a ``CLIPTokenizer`` from them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe_files(vocabulary())
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(out_dir, model_max_length=MAX_TEXT_LEN)
    tok.save_pretrained(out_dir)
    _legacy_tokenizer_json(out_dir / "tokenizer.json")
    return tok


def _legacy_tokenizer_json(path: Path) -> None:
    """Write ``tokenizer.json``'s BPE model in the format every tokenizers release reads.

    tokenizers >= 0.20 saves merges as pairs and adds ``ignore_merges``; releases before it (transformers 4.37-4.43,
    as LLaVA pins) read only ``"a b"`` strings and reject the extra field. The content is the same.
    """
    if not path.exists():
        return
    data = json.loads(path.read_text())
    bpe = data["model"]
    bpe["merges"] = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    bpe.pop("ignore_merges", None)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def tiny_config(tokenizer: CLIPTokenizer, image_size: int = 64) -> CLIPConfig:
    """A CLIP small enough to pretrain in minutes on 2 CPU cores (~0.5M parameters)."""
    text = dict(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_TEXT_LEN, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=96, intermediate_size=192,
                  num_hidden_layers=3, num_attention_heads=4)
    # the sub-configs carry the projection width too: CLIP{Vision,Text}ModelWithProjection read it from there
    text["projection_dim"] = vision["projection_dim"] = 64
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def image_processor(image_size: int = 64) -> CLIPImageProcessor:
    # imported here: in transformers 5 without torchvision the name resolves to the PIL processor with a warning,
    # which the CLI and the scripts filter only once they run (genhancer.quiet), after this module's import
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def new_base(out_dir: Path, image_size: int = 64) -> tuple[CLIPModel, CLIPTokenizer, CLIPImageProcessor]:
    """A randomly initialised tiny CLIP with its tokenizer and processor (tokenizer + processor already saved)."""
    tok = save_tokenizer(Path(out_dir))
    proc = image_processor(image_size)
    proc.save_pretrained(out_dir)
    return CLIPModel(tiny_config(tok, image_size)), tok, proc
