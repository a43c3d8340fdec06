"""MMVP-VLM (Tong et al., "Eyes wide shut?", 2024) by the benchmark's reference protocol, batched.

Benchmark as distributed: ``Questions.csv`` (header ``Question ID,Type,Statement``, 270 rows; rows 2k-1 and 2k form
a pair, odd id first) and images at ``<image folder>/<Type>/<question id>.jpg``, the image folder named
``MLLM_VLM Images``, ``MLLM_VLM_Images`` or ``MMVP_VLM_Images``; both images of a pair come from the first row's
Type folder.

The reference (MMVP's ``scripts/evaluate_vlm.py`` and its transformers port used by DIVA / GenHancer), reproduced:

- text = ``"a photo of " + statement``; CLIP tokenised with padding to 77 and truncation, SigLIP padded to its
  tokenizer's max length (see :mod:`.models`); only ``input_ids`` go to the model;
- each statement is scored against the pair's two images: ``logits_per_text.softmax(-1)`` over the two images, in
  float32; it picks image 1 iff that probability is ``> 0.5`` (an exact tie picks image 2);
- ground truth: an odd question id is image 1, an even one image 2; a pair counts only if both statements are right;
- pair k (0-based, file order) belongs to category ``CATEGORIES[k // 15]``;
- category accuracy = ``(correct / (num_pairs // 9)) * 100`` in Python floats, average = ``sum(nine) / 9``. Nothing
  is rounded (the reference prints raw floats); reports round to one decimal for display only.

Batching changes only how often the towers run: every image and statement is embedded once, in batches (images
decoded and normalised to the processor's exact pixels in a thread ahead of the model, see :mod:`.pixels`; the
statements then tokenised there in one call), and each pair's 2x2 ``logits_per_text`` is formed from those
embeddings with the forward's own arithmetic (:meth:`EvalModel.logits_per_text`). Matrix products of other shapes round differently, so a batched probability
can differ from the pair-by-pair one in its last bits (measured: <= 1e-6 on CPU in fp32, up to a 12-layer model).
That decides a pick only for a probability at a hair's breadth from 0.5, so every statement whose probability is
within ``recheck_band`` (default 1e-5) of 0.5 is recomputed by the reference's own forward (its text with the pair's
two images): picks and scores then equal the reference's on the same machine; only probabilities far from a tie
differ, in their last bits.

Deviations from the reference script, all on inputs where it would crash or score silently wrong: the file is
validated first (see :func:`load_benchmark`), and non-RGB images are converted to RGB before the processor.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from genhancer.errors import ConfigError
from genhancer.evaluation import write_json
from genhancer.evaluation.models import EvalModel, read_image
from genhancer.evaluation.pixels import pixel_batches, worker_thread

PROMPT = "a photo of "
CATEGORIES = (
    "Orientation and Direction",
    "Presence of Specific Features",
    "State and Condition",
    "Quantity and Count",
    "Positional and Relational Context",
    "Color and Appearance",
    "Structural Characteristics",
    "Texts",
    "Viewpoint and Perspective",
)
PAIRS_PER_CATEGORY = 15
NUM_PAIRS = PAIRS_PER_CATEGORY * len(CATEGORIES)
IMAGE_FOLDERS = ("MLLM_VLM Images", "MLLM_VLM_Images", "MMVP_VLM_Images")
HEADER = ["Question ID", "Type", "Statement"]
RECHECK_BAND = 1e-5  # |p - 0.5| below which a batched probability is recomputed the reference's way
CSV_FIELDS = ["qid1", "qid2", "type", "category", "pred1", "pred2", "gt1", "gt2", "q1score", "q2score", "correct"]


@dataclass(frozen=True)
class Pair:
    """Two questions on two images; ``lines`` are their line numbers in Questions.csv (header = line 1)."""

    lines: tuple[int, int]
    qids: tuple[int, int]
    type: str
    statements: tuple[str, str]
    images: tuple[Path, Path]

    def where(self, j: int) -> str:
        return f"Questions.csv line {self.lines[j]} (Question ID {self.qids[j]})"

    def read_image(self, j: int):
        """Image ``j`` (0 or 1) as RGB PIL; errors name the question's line and the file."""
        try:
            return read_image(self.images[j])
        except ConfigError as err:  # the line is named only on error: formatting it for every image costs GIL time
            raise ConfigError(f"{self.where(j)}: {err}") from None


@dataclass
class MMVPResult:
    """Per-pair predictions (rows of the predictions CSV) and scores: nine categories + ``"average"``, in %."""

    rows: list[dict]
    scores: dict[str, float]

    @property
    def correct_pairs(self) -> int:
        return sum(row["correct"] for row in self.rows)


def ground_truth(qid: int) -> int:
    """The image (1 or 2) a question's statement describes: odd ids image 1, even ids image 2."""
    return 1 if qid % 2 == 1 else 2


def category_of(pair_index: int) -> str:
    """Category of the pair at ``pair_index`` (0-based, file order): consecutive blocks of 15 pairs."""
    return CATEGORIES[pair_index // PAIRS_PER_CATEGORY]


def find_image_folder(root: Path) -> Path:
    """The benchmark's image folder under any of the names it circulates with."""
    for name in IMAGE_FOLDERS:
        if (root / name).is_dir():
            return root / name
    raise ConfigError(f"no image folder in {root}: expected one of {', '.join(repr(n) for n in IMAGE_FOLDERS)}")


def _read_rows(csv_path: Path) -> list[tuple[int, int, str, str]]:
    """``(line, question id, type, statement)`` of every non-empty row after the header, validated."""
    rows = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [cell.strip() for cell in next(reader, [])]
        if header != HEADER:
            raise ConfigError(f"{csv_path} line 1: header must be {','.join(HEADER)}, got {','.join(header)!r}")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank lines carry no question
            line = reader.line_num
            if len(row) != 3:
                raise ConfigError(f"{csv_path} line {line}: expected 3 fields ({','.join(HEADER)}), got {len(row)}")
            try:
                qid = int(row[0])
            except ValueError:
                raise ConfigError(f"{csv_path} line {line}: Question ID {row[0]!r} is not a number") from None
            rows.append((line, qid, row[1], row[2]))
    return rows


def load_benchmark(root: str | Path) -> list[Pair]:
    """Read and validate an MMVP-VLM benchmark directory into its 135 pairs, in file order.

    Raises ConfigError naming the file and line for: a missing Questions.csv or image folder, a bad header, a row
    without 3 fields, a non-numeric id, an odd number of rows, a pair that is not (odd id, next even id), a total
    other than 135 pairs, a category block whose pairs are of more than one Type or a Type spread over two blocks
    (a category with other than 15 pairs), and a missing image.
    """
    root = Path(root)
    csv_path = root / "Questions.csv"
    if not csv_path.is_file():
        raise ConfigError(f"{csv_path} not found: --benchmark must be the MMVP-VLM folder holding Questions.csv")
    image_folder = find_image_folder(root)
    rows = _read_rows(csv_path)
    if len(rows) % 2:
        raise ConfigError(
            f"{csv_path} has {len(rows)} question rows, an odd number: line {rows[-1][0]} has no partner row"
        )
    pairs, type_folders = [], {}
    for first, second in zip(rows[::2], rows[1::2]):
        (line1, qid1, qtype, statement1), (line2, qid2, _, statement2) = first, second
        if qid1 % 2 != 1 or qid2 != qid1 + 1:
            raise ConfigError(
                f"{csv_path} lines {line1}-{line2}: a pair is an odd Question ID followed by the next even one, "
                f"got {qid1} and {qid2}"
            )
        folder = type_folders.get(qtype) or type_folders.setdefault(qtype, image_folder / qtype)  # one join a Type
        images = (folder / f"{qid1}.jpg", folder / f"{qid2}.jpg")
        pairs.append(Pair((line1, line2), (qid1, qid2), qtype, (statement1, statement2), images))
    if len(pairs) != NUM_PAIRS:
        raise ConfigError(
            f"{csv_path} holds {len(pairs)} pairs; the protocol assigns {PAIRS_PER_CATEGORY} consecutive pairs to "
            f"each of its {len(CATEGORIES)} categories ({NUM_PAIRS} pairs)"
        )
    _check_categories(csv_path, pairs)
    files = {qtype: _file_names(folder) for qtype, folder in type_folders.items()}  # a listing each, not 270 stats
    for pair in pairs:
        for j, image in enumerate(pair.images):
            # is_file only for a name not listed: a case-insensitive file system may still hold it
            if f"{pair.qids[j]}.jpg" not in files[pair.type] and not image.is_file():
                raise ConfigError(f"{pair.where(j)}: image {image} not found")
    return pairs


def _file_names(folder: Path) -> set[str]:
    """Names of the files (links to files included) in ``folder``; empty if it is missing or not a folder."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name for entry in entries if entry.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _check_categories(csv_path: Path, pairs: list[Pair]) -> None:
    """Each block of 15 pairs must be of one Type, and each Type in one block: else a category is miscounted."""
    block_of_type: dict[str, str] = {}
    for index, pair in enumerate(pairs):
        category = category_of(index)
        block_type = pairs[index - index % PAIRS_PER_CATEGORY].type
        if pair.type != block_type or block_of_type.setdefault(pair.type, category) != category:
            raise ConfigError(
                f"{csv_path} line {pair.lines[0]}: pair {pair.qids} of Type {pair.type!r} is pair "
                f"{index % PAIRS_PER_CATEGORY + 1} of category {category!r}, whose first pair is of Type "
                f"{block_type!r}: each category must be exactly {PAIRS_PER_CATEGORY} consecutive pairs of one Type"
            )


def score(pairs: list[Pair], probs: np.ndarray) -> MMVPResult:
    """Predictions and scores from ``probs``: ``(P, 2)`` float32, each statement's probability of image 1."""
    correct_per_category = dict.fromkeys(CATEGORIES, 0)
    rows = []
    for index, (pair, (p1, p2)) in enumerate(zip(pairs, probs)):
        pred = (1 if p1 > 0.5 else 2, 1 if p2 > 0.5 else 2)
        gt = (ground_truth(pair.qids[0]), ground_truth(pair.qids[1]))
        correct = pred == gt
        category = category_of(index)
        correct_per_category[category] += correct
        rows.append({
            "qid1": pair.qids[0], "qid2": pair.qids[1], "type": pair.type, "category": category,
            "pred1": f"img{pred[0]}", "pred2": f"img{pred[1]}", "gt1": f"img{gt[0]}", "gt2": f"img{gt[1]}",
            "q1score": p1, "q2score": p2, "correct": int(correct),
        })  # fmt: skip
    pairs_per_category = len(pairs) // len(CATEGORIES)
    scores = {c: (correct_per_category[c] / pairs_per_category) * 100 for c in CATEGORIES}
    scores["average"] = sum([scores[c] for c in CATEGORIES]) / len(CATEGORIES)
    return MMVPResult(rows, scores)


def evaluate(
    model: EvalModel, root: str | Path, batch_size: int = 32, recheck_band: float = RECHECK_BAND
) -> MMVPResult:
    """The protocol, batched: all 270 images and 270 statements through the towers ``batch_size`` at a time.

    Statements with a probability within ``recheck_band`` of 0.5 are recomputed by the reference's forward (see the
    module docstring); ``recheck_band=0`` turns that off.
    """
    pairs = load_benchmark(root)
    load = lambda i: pairs[i // 2].read_image(i % 2)  # image i is image i % 2 of pair i // 2
    with worker_thread() as worker:  # prepares the images ahead of the vision tower, then tokenises
        batches = pixel_batches(model.image_processor, load, 2 * len(pairs), batch_size, worker)
        ids = worker.submit(model.tokenize, [PROMPT + s for pair in pairs for s in pair.statements])  # all 270
        image_embeds = torch.cat([model.embed_pixels(pixels) for pixels in batches])
        text_embeds = torch.cat([model.embed_ids(chunk) for chunk in ids.result().split(batch_size)])
    # (P, 2 statements, D) x (P, 2 images, D) -> (P, 2, 2): each pair's logits_per_text
    logits = model.logits_per_text(text_embeds.view(len(pairs), 2, -1), image_embeds.view(len(pairs), 2, -1))
    probs = logits.softmax(dim=-1)[..., 0].cpu().numpy()
    near_tie = np.abs(probs.astype(np.float64) - 0.5) < recheck_band  # (P, 2)
    for k in np.flatnonzero(near_tie.any(axis=1)):
        pixels = _pair_pixels(model, pairs[k])
        for j in np.flatnonzero(near_tie[k]):
            probs[k, j] = _reference_prob(model, pixels, pairs[k].statements[j])
    return score(pairs, probs)


def _pair_pixels(model: EvalModel, pair: Pair) -> torch.Tensor:
    """``(2, 3, H, W)``: the pair's images processed one at a time, as the reference does."""
    return torch.cat([model.pixel_values([pair.read_image(j)]) for j in (0, 1)])


@torch.no_grad()
def _reference_prob(model: EvalModel, pixels: torch.Tensor, statement: str) -> np.float32:
    """A statement's float32 probability of image 1: the reference's forward of one text with the pair's images."""
    out = model.model(
        input_ids=model.tokenize([PROMPT + statement]).to(model.device),
        pixel_values=pixels.to(model.device, model.dtype),
    )
    return out.logits_per_text.float().softmax(dim=-1).cpu().numpy()[0][0]


def evaluate_pairwise(model: EvalModel, root: str | Path) -> MMVPResult:
    """The protocol as the reference runs it: per pair, one full forward per statement on the pair's two images."""
    pairs = load_benchmark(root)
    probs = np.zeros((len(pairs), 2), dtype=np.float32)
    for k, pair in enumerate(tqdm(pairs, desc="pairs", disable=None, leave=False)):
        pixels = _pair_pixels(model, pair)
        probs[k] = [_reference_prob(model, pixels, statement) for statement in pair.statements]
    return score(pairs, probs)


def write_results(result: MMVPResult, out_dir: str | Path, meta: dict) -> tuple[Path, Path]:
    """Write ``mmvp_predictions.csv`` (one row per pair) and ``mmvp_scores.json`` (scores + ``meta``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "mmvp_predictions.csv", out_dir / "mmvp_scores.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(result.rows)
    summary = {**meta, "scores": result.scores, "correct_pairs": result.correct_pairs, "num_pairs": len(result.rows)}
    return csv_path, write_json(json_path, summary)
