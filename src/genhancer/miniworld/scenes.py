"""Procedural scenes with known fine-grained attributes, one attribute family per MMVP visual pattern.

A scene is a group of 1-4 identical objects (circle, square or diamond) next to a card showing a glyph. The
object's shape and the card are always named in captions (they play the part of "a dog" in a real caption); the
nine fine attributes below are each mentioned only with probability ``p``, which reproduces the weak pressure on
details that leaves real CLIP models blind to them.

=============================== ============= ===========================================
MMVP pattern                    attribute     values
=============================== ============= ===========================================
Orientation and Direction       direction     a nose on each object points up/down/left/right
Presence of Specific Features   mark          a black dot inside each object, or none
State and Condition             state         filled or outlined
Quantity and Count              count         1-4 objects
Positional and Relational       relation      the objects are left of / right of / above / below the card
Color and Appearance            colour        red, green, blue, yellow
Structural Characteristics      structure     a zigzag crack across each object, or intact
Texts                           text          the glyph on the card
Viewpoint and Perspective       view          close-up or far away (the whole scene is smaller)
=============================== ============= ===========================================

Everything is a pure function of the scene's seed: ``render(scene_from_seed(s), size)`` is deterministic at any
resolution (drawn 4x supersampled, then downsampled).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "diamond")
ATTRIBUTES: dict[str, tuple] = {
    "direction": ("up", "down", "left", "right"),
    "mark": ("dot", "none"),
    "state": ("filled", "outlined"),
    "count": (1, 2, 3, 4),
    "relation": ("left", "right", "above", "below"),
    "colour": ("red", "green", "blue", "yellow"),
    "structure": ("cracked", "intact"),
    "text": ("a", "e", "h", "k", "t", "x"),
    "view": ("close", "far"),
}
# MMVP-VLM category name of each attribute, in the benchmark's order.
PATTERNS: dict[str, str] = {
    "direction": "Orientation and Direction",
    "mark": "Presence of Specific Features",
    "state": "State and Condition",
    "count": "Quantity and Count",
    "relation": "Positional and Relational Context",
    "colour": "Color and Appearance",
    "structure": "Structural Characteristics",
    "text": "Texts",
    "view": "Viewpoint and Perspective",
}
RGB = {"red": (215, 45, 40), "green": (40, 165, 60), "blue": (45, 85, 215), "yellow": (230, 195, 30)}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
GLYPHS = {  # 5x7 bitmaps, rows top to bottom
    "a": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "e": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "h": ("10001", "10001", "10001", "11111", "10001", "10001", "10001"),
    "k": ("10001", "10010", "10100", "11000", "10100", "10010", "10001"),
    "t": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "x": ("10001", "10001", "01010", "00100", "01010", "10001", "10001"),
}
_OFFSETS = {  # object centres of a group in units of one cell
    1: [(0.0, 0.0)],
    2: [(-0.5, 0.0), (0.5, 0.0)],
    3: [(-0.5, 0.5), (0.5, 0.5), (0.0, -0.5)],
    4: [(-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)],
}
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Style:
    """How boldly a world draws its details and how much nuisance it adds (sizes in units of the image width)."""

    radius: float = 0.1  # object radius, close view
    nose: float = 1.0  # length and width of the direction nose, relative to the first edition
    dot: float = 0.3  # dot radius / object radius
    crack: float = 0.14  # crack line width / object radius
    card: float = 0.3  # card side, close view
    glyph: float = 0.7  # glyph height / card side
    background: int = 190  # background channels are drawn from [background, 255]
    shift: float = 0.05  # composition shift, each axis
    tint: int = 20  # object colour tint, each channel


FIRST_EDITION = Style()
# The second edition: details drawn boldly enough that reconstruction pays for them (chosen on the val split with
# ``genhancer miniworld incentive``; docs/miniworld.md), a paler, less varied background, a smaller shift.
SECOND_EDITION = Style(radius=0.125, nose=2.2, dot=0.55, crack=0.4, card=0.3, glyph=0.85, background=235, shift=0.015)
WORLD = SECOND_EDITION  # the world every command draws: see ``use_style``


def use_style(style: Style) -> None:
    """Draw every later scene (and sample its nuisance) with ``style``: experiments over world designs."""
    global WORLD
    WORLD = style


@dataclass(frozen=True)
class Scene:
    """Attributes (the labels) plus nuisance factors (background, jitter) that no caption mentions."""

    shape: str
    direction: str
    mark: str
    state: str
    count: int
    relation: str
    colour: str
    structure: str
    text: str
    view: str
    background: tuple[int, int, int]
    shift: tuple[float, float]
    tint: tuple[int, int, int]

    @property
    def labels(self) -> dict:
        """Attribute name -> value index, for probes."""
        return {a: ATTRIBUTES[a].index(getattr(self, a)) for a in ATTRIBUTES} | {"shape": SHAPES.index(self.shape)}

    def with_(self, **changes) -> "Scene":
        return dataclasses.replace(self, **changes)


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw attributes uniformly and fresh nuisance factors."""
    attrs = {a: vals[rng.integers(len(vals))] for a, vals in ATTRIBUTES.items()}
    attrs["count"] = int(attrs["count"])
    return Scene(shape=SHAPES[rng.integers(len(SHAPES))], **attrs, **sample_nuisance(rng))


def sample_nuisance(rng: np.random.Generator) -> dict:
    return {
        "background": tuple(int(v) for v in rng.integers(WORLD.background, 256, size=3)),
        "shift": tuple(float(v) for v in rng.uniform(-WORLD.shift, WORLD.shift, size=2)),
        "tint": tuple(int(v) for v in rng.integers(-WORLD.tint, WORLD.tint + 1, size=3)),
    }


def scene_from_seed(seed: int) -> Scene:
    return sample_scene(np.random.default_rng(seed))


def other_value(scene: Scene, attribute: str, rng: np.random.Generator):
    """A value of ``attribute`` different from the scene's."""
    choices = [v for v in ATTRIBUTES[attribute] if v != getattr(scene, attribute)]
    return choices[rng.integers(len(choices))]


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image of ``size`` x ``size`` pixels."""
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(img)
    scale = 1.0 if scene.view == "close" else 0.6
    radius, card = WORLD.radius * scale, WORLD.card * scale
    cell = 2.6 * radius
    group = cell * (1 if scene.count == 1 else 2)
    gap = 0.07 * scale
    total = group + gap + card
    along = (-total / 2 + group / 2, total / 2 - card / 2)  # group centre, card centre along the axis
    if scene.relation in ("right", "below"):
        along = (-along[0], -along[1])
    horizontal = scene.relation in ("left", "right")
    cx, cy = 0.5 + scene.shift[0], 0.5 + scene.shift[1]
    gx, gy = (cx + along[0], cy) if horizontal else (cx, cy + along[0])
    bx, by = (cx + along[1], cy) if horizontal else (cx, cy + along[1])
    colour = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(RGB[scene.colour], scene.tint))
    for ox, oy in _OFFSETS[scene.count]:
        _draw_object(draw, scene, ((gx + ox * cell) * big, (gy + oy * cell) * big), radius * big, colour)
    _draw_card(draw, scene.text, (bx * big, by * big), card * big)
    return img.resize((size, size), Image.LANCZOS)


def _outline(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if shape == "circle":
        return [(x + r * np.cos(a), y + r * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 48, endpoint=False)]
    if shape == "square":
        s = r * 0.88
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    return [(x, y - r * 1.1), (x + r * 1.1, y), (x, y + r * 1.1), (x - r * 1.1, y)]


def _draw_object(draw: ImageDraw.ImageDraw, scene: Scene, centre: tuple[float, float], r: float, colour) -> None:
    x, y = centre
    ux, uy = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}[scene.direction]
    px, py = -uy, ux
    w, tip = 0.45 * WORLD.nose, 0.8 + 0.85 * WORLD.nose
    nose = [(x + ux * r * 0.8 + px * r * w, y + uy * r * 0.8 + py * r * w),
            (x + ux * r * tip, y + uy * r * tip),
            (x + ux * r * 0.8 - px * r * w, y + uy * r * 0.8 - py * r * w)]
    draw.polygon(nose, fill=colour)
    points = _outline(scene.shape, x, y, r)
    if scene.state == "filled":
        draw.polygon(points, fill=colour)
    else:
        draw.polygon(points, fill=scene.background, outline=colour, width=max(1, round(r * 0.28)))
    if scene.structure == "cracked":
        zig = [(x - r * 0.75 + i * r * 0.3, y - r * 0.4 + (0.22 * r if i % 2 else -0.1 * r)) for i in range(6)]
        draw.line(zig, fill=(20, 20, 20), width=max(1, round(r * WORLD.crack)))
    if scene.mark == "dot" and WORLD.dot > 0:
        d = r * WORLD.dot
        draw.ellipse((x - d, y + r * 0.05 - d, x + d, y + r * 0.05 + d), fill=(15, 15, 15))


def _draw_card(draw: ImageDraw.ImageDraw, text: str, centre: tuple[float, float], size: float) -> None:
    x, y = centre
    h = size / 2
    draw.rectangle((x - h, y - h, x + h, y + h), fill=(250, 250, 250), outline=(60, 60, 60), width=max(1, round(size * 0.05)))
    px = size * WORLD.glyph / 7
    for row, bits in enumerate(GLYPHS[text]):
        for col, bit in enumerate(bits):
            if bit == "1":
                x0, y0 = x - 2.5 * px + col * px, y - 3.5 * px + row * px
                draw.rectangle((x0, y0, x0 + px, y0 + px), fill=(0, 0, 0))


def phrase(scene: Scene, mention: set[str]) -> str:
    """A description of ``scene`` naming the objects and the card, plus the attributes in ``mention``.

    It is an MMVP statement as it stands; a training caption is ``"a photo of " + phrase``, as the MMVP-VLM
    protocol prompts.
    """
    words = []
    noun = scene.shape
    if "count" in mention:
        words.append(NUMBERS[scene.count])
        noun += "s" if scene.count > 1 else ""
    else:
        words.append("some")
        noun += "s"
    words += [getattr(scene, a) for a in ("colour", "state", "structure") if a in mention]
    words.append(noun)
    if "mark" in mention:
        words.append("with a dot" if scene.mark == "dot" else "without a dot")
    if "direction" in mention:
        words.append(f"pointing {scene.direction}")
    if "relation" in mention:
        words.append({"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[scene.relation])
    else:
        words.append("and")
    words.append("a card")
    if "text" in mention:
        words.append(f"showing the letter {scene.text}")
    if "view" in mention:
        words.append({"close": "seen up close", "far": "seen from far away"}[scene.view])
    return " ".join(words)


# How often a training caption names each attribute. Like web alt-text, captions often say what is large and
# salient (colour, how many, filled or not, close or far) and rarely the small details or the exact layout: those
# are the patterns a contrastively trained encoder stays blind to.
MENTION = {"colour": 0.8, "count": 0.5, "state": 0.5, "view": 0.5,
           "direction": 0.1, "mark": 0.1, "relation": 0.1, "structure": 0.1, "text": 0.1}


def caption(scene: Scene, rng: np.random.Generator, p: float | dict[str, float] | None = None) -> str:
    """A training caption: attribute ``a`` is mentioned independently with probability ``p[a]`` (default
    ``MENTION``; a number applies to every attribute)."""
    probs = MENTION if p is None else p if isinstance(p, dict) else dict.fromkeys(ATTRIBUTES, p)
    return "a photo of " + phrase(scene, {a for a in ATTRIBUTES if rng.random() < probs[a]})


def vocabulary() -> list[str]:
    """Every word a caption can contain (the tokenizer's closed vocabulary)."""
    words = {"a", "photo", "of", "seen", "from", "away", "some", "with", "without", "dot", "pointing", "left", "right",
             "above", "below", "and", "to", "card", "showing", "the", "letter", "up", "close", "far"}
    words |= set(SHAPES) | {s + "s" for s in SHAPES} | set(NUMBERS.values())
    for values in ATTRIBUTES.values():
        words |= {str(v) for v in values}
    return sorted(words)


# First seed of each split. Training draws seeds upwards from 0; tuning uses "val"; the benchmarks and probes use
# their own ranges and are never trained or tuned on.
SPLITS = {"train": 0, "val": 10_000_000, "mmvp": 20_000_000, "mmvp-large": 30_000_000, "probe": 40_000_000}
FRESH = 50_000_000  # seeds from here on are in no split: fresh draws, to check results on scenes never seen


def render_many(scenes: list[Scene], size: int = 64) -> np.ndarray:
    """``(N, size, size, 3)`` uint8 renders."""
    return np.stack([np.asarray(render(s, size)) for s in scenes])


def write_folder(out: str | Path, num: int, first_seed: int = SPLITS["train"], size: int = 64,
                 p: float | None = None) -> Path:
    """Render scenes ``first_seed .. first_seed + num - 1`` to ``out/<seed>.png``, with ``out/labels.jsonl``: one
    line per image with its seed, attributes and a caption (mentioning each attribute with probability ``p``;
    default: the per-attribute rates ``MENTION``, as the shipped base was pretrained)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(first_seed)
    with open(out / "labels.jsonl", "w") as f:
        for seed in range(first_seed, first_seed + num):
            scene = scene_from_seed(seed)
            render(scene, size).save(out / f"{seed:08d}.png")
            attributes = {"shape": scene.shape} | {a: getattr(scene, a) for a in ATTRIBUTES}
            f.write(json.dumps({"file": f"{seed:08d}.png", "seed": seed, "attributes": attributes,
                                "caption": caption(scene, rng, p)}) + "\n")
    return out
