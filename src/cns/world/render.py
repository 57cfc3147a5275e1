"""Deterministic renderer for the procedural "tiny world".

A `Scene` holds one or two objects (plain shapes or composite creatures, optionally
decorated), a background and a rendering style. `render` draws it with Pillow + numpy
at 4x supersampling and downsamples with LANCZOS; `caption` describes it with a small,
regular grammar whose words are listed by `vocabulary_words`; `sample_scene` draws
random scenes from a `numpy.random.Generator`, keeping held-out attribute
combinations and the looks reserved for personal concepts out of the train split.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

SUPERSAMPLE = 4

# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

COLORS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 165, 70),
    "blue": (40, 95, 230),
    "yellow": (250, 215, 30),
    "orange": (250, 135, 20),
    "purple": (150, 60, 200),
    "white": (248, 248, 248),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "heart", "diamond")
CREATURES: tuple[str, ...] = ("robot", "bird", "fish")
OBJECT_CLASSES: tuple[str, ...] = SHAPES + CREATURES

# Object radius as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.14, "big": 0.23}

# Object centre (x, y) as fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.26, 0.5),
    "right": (0.74, 0.5),
    "center": (0.5, 0.5),
    "top": (0.5, 0.26),
    "bottom": (0.5, 0.74),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "center": "in the center",
    "top": "at the top",
    "bottom": "at the bottom",
}
# Ordered position pairs used by two-object scenes (first object, second object).
POSITION_PAIRS: tuple[tuple[str, str], ...] = (
    ("left", "right"),
    ("right", "left"),
    ("top", "bottom"),
    ("bottom", "top"),
)

# Decorations drawn on an object (or on a creature's body), each with its own color.
DECORATIONS: tuple[str, ...] = ("dots", "stripes", "border", "center", "half")
# Decorations that make no sense on a class (the ring's centre is a hole).
INCOMPATIBLE_DECORATIONS: dict[str, frozenset[str]] = {"ring": frozenset({"center"})}

GRAMMAR_WORDS: tuple[str, ...] = ("a", "an", "and", "with", "on", "the", "in", "at", "background", "style")

MIN_COLOR_DISTANCE = 90.0  # RGB distance required between object and background / decoration colors
MIN_DECORATION_BACKGROUND_DISTANCE = 60.0  # looser: decorations mostly sit inside their object


@dataclass(frozen=True)
class Background:
    """A background recipe: a base color with an optional ink pattern on top."""

    pattern: str = "plain"  # plain | stripes | dots | checks | grid | motifs
    base: RGB = (140, 140, 140)
    ink: RGB = (0, 0, 0)
    period: float = 1 / 8  # pattern period as a fraction of the image side
    diagonal: bool = False  # stripes at 45 degrees instead of horizontal
    motif: str = "star"  # shape repeated by the "motifs" pattern
    motif_scale: float = 0.26  # motif radius as a fraction of the period


@dataclass(frozen=True)
class Style:
    """A rendering recipe applied to every object of a scene."""

    fill: str = "solid"  # solid | none | hatch | crosshatch | halftone
    outlines: int = 0  # number of concentric outlines (0, 1 or 2)
    pixel_cells: int = 0  # > 0: snap objects to a grid with this many cells per side
    cell_gaps: bool = False  # leave thin gaps between pixel cells


BACKGROUNDS: dict[str, Background] = {
    "gray": Background("plain", (140, 140, 140)),
    "beige": Background("plain", (225, 210, 175)),
    "navy": Background("plain", (30, 40, 90)),
    "pink": Background("plain", (240, 195, 210)),
    "striped": Background("stripes", (215, 215, 225), (180, 185, 200)),
    "dotted": Background("dots", (60, 65, 80), (105, 110, 130)),
    "checkered": Background("checks", (190, 190, 190), (155, 155, 155)),
    "grid": Background("grid", (235, 238, 242), (150, 165, 195), period=1 / 6),
}
PLAIN_BACKGROUNDS: tuple[str, ...] = tuple(k for k, v in BACKGROUNDS.items() if v.pattern == "plain")
PATTERNED_BACKGROUNDS: tuple[str, ...] = tuple(k for k, v in BACKGROUNDS.items() if v.pattern != "plain")

STYLES: dict[str, Style] = {
    "flat": Style(),
    "outline": Style(fill="none", outlines=1),
    "pixelated": Style(pixel_cells=20),
    "hatched": Style(fill="hatch", outlines=1),
}

# Shapes drawn with only horizontal and vertical edges. Pixelated style snaps edges to the pixel
# grid, which leaves these as they are: a flat and a pixelated square differ only in a side snapped
# to the cell size (about one pixel at 64 px).
AXIS_ALIGNED_SHAPES: tuple[str, ...] = ("square", "cross")
# Decorations drawn with only horizontal and vertical edges (on those shapes); dots and a center
# are round, and pixelation shows on them.
AXIS_ALIGNED_DECORATIONS: tuple[str, ...] = ("stripes", "border", "half")
# Below this share of its colored area (`named_color_share`), an object's named color is not its
# main color: the world never draws such an object (`is_legible`).
MIN_NAMED_COLOR_SHARE = 0.5

# Attribute combinations that pretraining (split="train") never shows.
HELD_OUT_CLASS_COLOR: frozenset[tuple[str, str]] = frozenset(
    {
        ("circle", "purple"),
        ("square", "orange"),
        ("triangle", "blue"),
        ("star", "green"),
        ("ring", "red"),
        ("cross", "yellow"),
        ("heart", "white"),
        ("diamond", "black"),
        ("robot", "green"),
        ("bird", "blue"),
        ("fish", "purple"),
    }
)
HELD_OUT_CLASS_BACKGROUND: frozenset[tuple[str, str]] = frozenset(
    {
        ("star", "checkered"),
        ("heart", "striped"),
        ("circle", "grid"),
        ("robot", "dotted"),
        ("fish", "pink"),
    }
)

# (class, color, decoration, decoration color) looks reserved for the personal concepts
# of `cns.world.concepts`: no sampler split ever draws them.
RESERVED_LOOKS: frozenset[tuple[str, str, str, str]] = frozenset(
    {
        ("heart", "purple", "dots", "yellow"),
        ("heart", "purple", "border", "white"),
        ("star", "orange", "stripes", "black"),
        ("star", "orange", "center", "white"),
        ("ring", "blue", "dots", "white"),
        ("ring", "blue", "border", "yellow"),
        ("circle", "yellow", "stripes", "red"),
        ("circle", "yellow", "border", "black"),
        ("diamond", "green", "center", "orange"),
        ("diamond", "green", "stripes", "white"),
        ("robot", "blue", "dots", "orange"),
        ("bird", "red", "half", "white"),
        ("fish", "orange", "stripes", "white"),
        ("fish", "orange", "border", "black"),
    }
)


# ---------------------------------------------------------------------------
# Scene description
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoration:
    """A decoration (dots, stripes, border, center, half) in one color."""

    kind: str
    color: str


@dataclass(frozen=True)
class ObjectSpec:
    """One object: a shape or creature with color, size, position and decorations.

    `part_colors` overrides the color of named creature parts (personal creatures only);
    `personal` objects are captioned by size, class word and position only;
    `offset` is a small jitter of the centre (fractions of the image side).
    """

    shape: str
    color: str
    size: str = "big"
    position: str = "center"
    decorations: tuple[Decoration, ...] = ()
    part_colors: tuple[tuple[str, str], ...] = ()
    personal: bool = False
    offset: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Scene:
    """One image: 1 or 2 objects, a background and a style.

    Background and style are vocabulary words, or (for personal concepts) unnamed
    `Background` / `Style` recipes, which captions mention by class word only.
    """

    objects: tuple[ObjectSpec, ...]
    background: Union[str, Background] = "gray"
    style: Union[str, Style] = "flat"


def background_recipe(background: Union[str, Background]) -> Background:
    """The `Background` recipe of a background word or recipe."""
    return BACKGROUNDS[background] if isinstance(background, str) else background


def style_recipe(style: Union[str, Style]) -> Style:
    """The `Style` recipe of a style word or recipe."""
    return STYLES[style] if isinstance(style, str) else style


# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def decoration_phrase(decoration: Decoration) -> str:
    """E.g. 'white dots', 'a black border', 'an orange center'."""
    if decoration.kind in ("dots", "stripes"):
        return f"{decoration.color} {decoration.kind}"
    return f"{_article(decoration.color)} {decoration.color} {decoration.kind}"


def object_phrase(obj: ObjectSpec) -> str:
    """E.g. 'a small red star with white dots on the left' ('a big star on the left' if personal)."""
    where = POSITION_PHRASES[obj.position]
    if obj.personal:
        return f"a {obj.size} {obj.shape} {where}"
    words = f"a {obj.size} {obj.color} {obj.shape}"
    if obj.decorations:
        words += " with " + " and ".join(decoration_phrase(d) for d in obj.decorations)
    return f"{words} {where}"


def caption(scene: Scene) -> str:
    """Caption of a scene.

    E.g. 'a small red star on the left and a big blue ring on the right, on a striped background, outline style'.
    """
    objects = " and ".join(object_phrase(o) for o in scene.objects)
    background = scene.background if isinstance(scene.background, str) else None
    style = scene.style if isinstance(scene.style, str) else None
    bg_part = f"on a {background} background" if background else "on a background"
    style_part = f"{style} style" if style else "style"
    return f"{objects}, {bg_part}, {style_part}"


def caption_words(text: str) -> list[str]:
    """The words of a caption (commas dropped)."""
    return text.replace(",", " ").split()


def vocabulary_words() -> list[str]:
    """Sorted list of every word a caption (scene or concept example) can contain."""
    words = set(GRAMMAR_WORDS) | set(COLORS) | set(OBJECT_CLASSES) | set(SIZES) | set(DECORATIONS)
    words |= set(BACKGROUNDS) | set(STYLES)
    for phrase in POSITION_PHRASES.values():
        words |= set(phrase.split())
    return sorted(words)


_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}
_OBJECT_SPLIT = re.compile(r" and (?=a (?:%s) )" % "|".join(SIZES))


def _parse_decoration(text: str) -> Decoration:
    words = text.split()
    if words[0] in ("a", "an"):
        words = words[1:]
    if len(words) != 2 or words[0] not in COLORS or words[1] not in DECORATIONS:
        raise ValueError(f"bad decoration phrase: {text!r}")
    return Decoration(words[1], words[0])


def _parse_object(text: str) -> ObjectSpec:
    for phrase, position in _PHRASE_TO_POSITION.items():
        if text.endswith(" " + phrase):
            head = text[: -len(phrase) - 1]
            break
    else:
        raise ValueError(f"no position in {text!r}")
    head, _, decos = head.partition(" with ")
    words = head.split()
    if words[0] != "a" or words[1] not in SIZES or words[-1] not in OBJECT_CLASSES:
        raise ValueError(f"bad object phrase: {text!r}")
    if len(words) == 3:  # personal object: class word only
        if decos:
            raise ValueError(f"personal object with decorations: {text!r}")
        return ObjectSpec(words[2], "", words[1], position, personal=True)
    if len(words) != 4 or words[2] not in COLORS:
        raise ValueError(f"bad object phrase: {text!r}")
    decorations = tuple(_parse_decoration(d) for d in decos.split(" and ")) if decos else ()
    return ObjectSpec(words[3], words[2], words[1], position, decorations)


def parse_caption(text: str) -> tuple[tuple[ObjectSpec, ...], str | None, str | None]:
    """Inverse of `caption`: (objects without offsets, background word, style word).

    Unnamed (personal) background / style slots parse as None; personal objects as
    `ObjectSpec(personal=True, color="")`. Raises ValueError on malformed captions.
    """
    parts = text.split(", ")
    if len(parts) != 3:
        raise ValueError(f"expected 3 comma-separated parts: {text!r}")
    objects = tuple(_parse_object(p) for p in _OBJECT_SPLIT.split(parts[0]))
    m = re.fullmatch(r"on a (?:(\w+) )?background", parts[1])
    if not m or (m.group(1) and m.group(1) not in BACKGROUNDS):
        raise ValueError(f"bad background part: {parts[1]!r}")
    m2 = re.fullmatch(r"(?:(\w+) )?style", parts[2])
    if not m2 or (m2.group(1) and m2.group(1) not in STYLES):
        raise ValueError(f"bad style part: {parts[2]!r}")
    return objects, m.group(1), m2.group(1)


# ---------------------------------------------------------------------------
# Rules: held-out combinations, reserved looks, contrast
# ---------------------------------------------------------------------------


def object_looks(obj: ObjectSpec) -> set[tuple[str, str, str, str]]:
    """The (class, color, decoration, decoration color) looks of an object."""
    return {(obj.shape, obj.color, d.kind, d.color) for d in obj.decorations}


def is_held_out(scene: Scene) -> bool:
    """True if the scene uses a held-out (class, color) or (class, background) pair."""
    background = scene.background if isinstance(scene.background, str) else None
    for obj in scene.objects:
        if (obj.shape, obj.color) in HELD_OUT_CLASS_COLOR:
            return True
        if background and (obj.shape, background) in HELD_OUT_CLASS_BACKGROUND:
            return True
    return False


def uses_reserved_look(scene: Scene) -> bool:
    """True if an object shows a look reserved for a personal concept."""
    return any(object_looks(o) & RESERVED_LOOKS for o in scene.objects)


def is_axis_aligned(obj: ObjectSpec) -> bool:
    """True if the object has only horizontal and vertical edges (`AXIS_ALIGNED_SHAPES`, `AXIS_ALIGNED_DECORATIONS`)."""
    return obj.shape in AXIS_ALIGNED_SHAPES and all(d.kind in AXIS_ALIGNED_DECORATIONS for d in obj.decorations)


def is_legible(scene: Scene) -> bool:
    """True if the render shows what the caption names: every object's named color covers at
    least `MIN_NAMED_COLOR_SHARE` of its colored area (`named_color_share`; a border in outline
    style covers all of it), and a scene in a named pixelated style has an object whose edges
    pixelation steps (a pixelated square is a flat square). `sample_scene` draws only such scenes."""
    style = style_recipe(scene.style)
    if isinstance(scene.style, str) and style.pixel_cells and all(is_axis_aligned(o) for o in scene.objects):
        return False
    return all(named_color_share(o, style) >= MIN_NAMED_COLOR_SHARE for o in scene.objects)


def color_distance(a: RGB, b: RGB) -> float:
    """Euclidean RGB distance."""
    return float(math.dist(a, b))


def has_enough_contrast(scene: Scene) -> bool:
    """Objects (and creature parts) stand out from the background colors, decorations from their object."""
    recipe = background_recipe(scene.background)
    tones = [recipe.base] if recipe.pattern == "plain" else [recipe.base, recipe.ink]
    for obj in scene.objects:
        for color in [obj.color] + [c for _, c in obj.part_colors]:
            if min(color_distance(COLORS[color], t) for t in tones) < MIN_COLOR_DISTANCE:
                return False
        for d in obj.decorations:
            if color_distance(COLORS[d.color], COLORS[obj.color]) < MIN_COLOR_DISTANCE:
                return False
            if min(color_distance(COLORS[d.color], t) for t in tones) < MIN_DECORATION_BACKGROUND_DISTANCE:
                return False
    return True


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------


def sample_object(
    rng: np.random.Generator,
    position: str,
    *,
    classes: Sequence[str] = OBJECT_CLASSES,
    creature_prob: float = 0.25,
    decoration_prob: float = 0.4,
    size: str | None = None,
) -> ObjectSpec:
    """Draw one base-world object (at most one decoration, no part colors) at `position`."""
    creatures = [c for c in classes if c in CREATURES]
    shapes = [c for c in classes if c in SHAPES]
    use_creature = creatures and (not shapes or rng.random() < creature_prob)
    shape = str(rng.choice(creatures if use_creature else shapes))
    color = str(rng.choice(list(COLORS)))
    size = size or str(rng.choice(list(SIZES)))
    decorations: tuple[Decoration, ...] = ()
    if rng.random() < decoration_prob:
        kinds = [k for k in DECORATIONS if k not in INCOMPATIBLE_DECORATIONS.get(shape, ())]
        colors = [c for c in COLORS if color_distance(COLORS[c], COLORS[color]) >= MIN_COLOR_DISTANCE]
        decorations = (Decoration(str(rng.choice(kinds)), str(rng.choice(colors))),)
    offset = (float(rng.uniform(-0.02, 0.02)), float(rng.uniform(-0.02, 0.02)))
    return ObjectSpec(shape, color, size, position, decorations, offset=offset)


def sample_scene(
    rng: np.random.Generator,
    split: str = "train",
    *,
    n_objects: int | None = None,
    creature_prob: float = 0.25,
    decoration_prob: float = 0.4,
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    styles: Sequence[str] = tuple(STYLES),
    max_tries: int = 10_000,
    legible: bool = True,
) -> Scene:
    """Draw a random scene; split "train" avoids held-out combos, "heldout" requires one.

    Both splits avoid the looks reserved for personal concepts, low-contrast colors and, with
    ``legible``, renders that do not show what their caption names (`is_legible`).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    for _ in range(max_tries):
        n = n_objects or int(rng.integers(1, 3))
        if n == 1:
            positions: tuple[str, ...] = (str(rng.choice(list(POSITIONS))),)
        elif n == 2:
            positions = POSITION_PAIRS[int(rng.integers(len(POSITION_PAIRS)))]
        else:
            raise ValueError("scenes hold 1 or 2 objects")
        objects = tuple(
            sample_object(rng, p, creature_prob=creature_prob, decoration_prob=decoration_prob) for p in positions
        )
        scene = Scene(objects, str(rng.choice(list(backgrounds))), str(rng.choice(list(styles))))
        if is_held_out(scene) != (split == "heldout"):
            continue
        if uses_reserved_look(scene) or not has_enough_contrast(scene):
            continue
        if legible and not is_legible(scene):
            continue
        return scene
    raise RuntimeError("could not sample a valid scene; constraints too tight")


# ---------------------------------------------------------------------------
# Rendering helpers (all at supersampled resolution, masks are float32 in [0, 1])
# ---------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) as fractions of the side."""
    c = (np.arange(side, dtype=np.float32) + 0.5) / side
    return np.meshgrid(c, c)


def _draw_mask(side: int, draw) -> np.ndarray:
    img = Image.new("L", (side, side), 0)
    draw(ImageDraw.Draw(img))
    return np.asarray(img, dtype=np.float32) / 255.0


def _min_filter_square(mask: np.ndarray, half: int) -> np.ndarray:
    """Minimum over the (2 half + 1)-pixel square around each pixel, zero outside the mask: one
    running minimum of shifted slices per axis (exact; a strided window view was 10x slower)."""
    padded = np.pad(mask, half)
    rows, cols = mask.shape
    out = padded[: rows].copy()
    for k in range(1, 2 * half + 1):
        np.minimum(out, padded[k: k + rows], out=out)
    result = out[:, :cols].copy()
    for k in range(1, 2 * half + 1):
        np.minimum(result, out[:, k: k + cols], out=result)
    return result


def _min_filter_cross(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return np.minimum.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])


def erode(mask: np.ndarray, radius: float) -> np.ndarray:
    """Erode a mask by about `radius` pixels with an octagonal structuring element."""
    square = int(round(0.414 * radius))
    diamond = int(round(radius)) - square
    out = _min_filter_square(mask, square) if square > 0 else mask
    for _ in range(max(diamond, 0)):
        out = _min_filter_cross(out)
    return out


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Polygon of a shape in the unit box [-1, 1]^2 (y down), centred on its bbox."""
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.radians([-90, 30, 150])]
    elif shape == "star":
        pts = [
            ((1.0 if i % 2 == 0 else 0.45) * math.cos(a), (1.0 if i % 2 == 0 else 0.45) * math.sin(a))
            for i, a in enumerate(np.radians(np.arange(-90, 270, 36)))
        ]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 80, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = list(zip(x.tolist(), y.tolist()))
    else:
        raise ValueError(shape)
    xs, ys = zip(*pts)
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    scale = 2.0 / max(max(xs) - min(xs), max(ys) - min(ys)) if shape in ("triangle", "star", "heart") else 1.0
    if shape == "triangle":
        scale *= 1.05
    return [((x - cx) * scale, (y - cy) * scale) for x, y in pts]


_POLYGONS = {s: _unit_polygon(s) for s in ("square", "triangle", "star", "diamond", "heart")}


def shape_mask(shape: str, cx: float, cy: float, r: float, side: int) -> np.ndarray:
    """Mask of a plain shape centred at pixel (cx, cy) with radius r."""

    def ellipse(d, rr, fill=255):
        d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fill)

    if shape == "circle":
        return _draw_mask(side, lambda d: ellipse(d, r))
    if shape == "ring":
        return _draw_mask(side, lambda d: (ellipse(d, r), ellipse(d, 0.58 * r, 0)))
    if shape == "cross":
        w, h = 0.3 * r, 0.92 * r
        return _draw_mask(
            side,
            lambda d: (
                d.rectangle([cx - w, cy - h, cx + w, cy + h], fill=255),
                d.rectangle([cx - h, cy - w, cx + h, cy + w], fill=255),
            ),
        )
    pts = [(cx + x * r, cy + y * r) for x, y in _POLYGONS[shape]]
    return _draw_mask(side, lambda d: d.polygon(pts, fill=255))


def _shade(rgb: RGB) -> RGB:
    """A darker (or, for dark colors, lighter) variant of a color."""
    lum = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255
    if lum > 0.3:
        return tuple(int(c * 0.62) for c in rgb)  # type: ignore[return-value]
    return tuple(int(c + (255 - c) * 0.45) for c in rgb)  # type: ignore[return-value]


def _is_light(rgb: RGB) -> bool:
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255 > 0.6


_LEG_GRAY: RGB = (85, 85, 95)


@dataclass
class _Part:
    name: str
    mask: np.ndarray
    color: RGB
    styled: bool = True  # False: small detail always drawn flat


def _creature_parts(obj: ObjectSpec, cx: float, cy: float, r: float, side: int) -> list[_Part]:
    """Parts of a creature in drawing order; the part named 'body' carries decorations."""
    body_rgb = COLORS[obj.color]
    override = {name: COLORS[c] for name, c in obj.part_colors}

    def px(x: float, y: float) -> tuple[float, float]:
        return cx + x * r, cy + y * r

    def rect(x0, y0, x1, y1):
        a, b = px(x0, y0), px(x1, y1)
        return _draw_mask(side, lambda d: d.rectangle([a[0], a[1], b[0], b[1]], fill=255))

    def rounded(x0, y0, x1, y1, rad):
        a, b = px(x0, y0), px(x1, y1)
        return _draw_mask(side, lambda d: d.rounded_rectangle([a[0], a[1], b[0], b[1]], radius=rad * r, fill=255))

    def ellipse(x, y, rx, ry):
        a, b = px(x - rx, y - ry), px(x + rx, y + ry)
        return _draw_mask(side, lambda d: d.ellipse([a[0], a[1], b[0], b[1]], fill=255))

    def poly(*pts):
        p = [px(x, y) for x, y in pts]
        return _draw_mask(side, lambda d: d.polygon(p, fill=255))

    eye_rgb = COLORS["black"] if _is_light(body_rgb) else COLORS["white"]
    parts: list[tuple[str, np.ndarray, RGB, bool]]
    if obj.shape == "robot":
        parts = [
            ("legs", rect(-0.32, 0.5, -0.12, 1.0) + rect(0.12, 0.5, 0.32, 1.0), _LEG_GRAY, True),
            ("arms", rect(-0.7, -0.1, -0.52, 0.36) + rect(0.52, -0.1, 0.7, 0.36), body_rgb, True),
            ("body", rounded(-0.52, -0.2, 0.52, 0.58, 0.08), body_rgb, True),
            ("antenna", rect(-0.05, -0.86, 0.05, -0.66), _LEG_GRAY, False),
            ("tip", ellipse(0.0, -0.88, 0.12, 0.12), body_rgb, False),
            ("head", rounded(-0.38, -0.72, 0.38, -0.24, 0.1), body_rgb, True),
            ("eyes", ellipse(-0.16, -0.5, 0.09, 0.09) + ellipse(0.16, -0.5, 0.09, 0.09), eye_rgb, False),
        ]
    elif obj.shape == "bird":
        beak = COLORS["yellow"] if obj.color in ("orange", "red") else COLORS["orange"]
        parts = [
            ("legs", rect(-0.22, 0.5, -0.14, 0.95) + rect(0.06, 0.5, 0.14, 0.95), _LEG_GRAY, False),
            ("tail", poly((-0.5, 0.05), (-1.0, -0.3), (-0.95, 0.25)), body_rgb, True),
            ("body", ellipse(-0.08, 0.15, 0.6, 0.42), body_rgb, True),
            ("wing", ellipse(-0.16, 0.1, 0.36, 0.2), _shade(body_rgb), True),
            ("beak", poly((0.66, -0.46), (1.0, -0.33), (0.66, -0.2)), beak, False),
            ("head", ellipse(0.45, -0.35, 0.3, 0.3), body_rgb, True),
            ("eyes", ellipse(0.54, -0.4, 0.08, 0.08), eye_rgb, False),
        ]
    elif obj.shape == "fish":
        parts = [
            ("tail", poly((-0.45, 0.0), (-1.0, -0.48), (-1.0, 0.48)), _shade(body_rgb), True),
            ("fin", poly((-0.2, -0.3), (0.25, -0.34), (-0.05, -0.68)), _shade(body_rgb), True),
            ("body", ellipse(0.1, 0.0, 0.68, 0.45), body_rgb, True),
            ("eyes", ellipse(0.46, -0.1, 0.12, 0.12), COLORS["white"], False),
            ("pupil", ellipse(0.5, -0.1, 0.06, 0.06), COLORS["black"], False),
        ]
    else:
        raise ValueError(f"unknown creature {obj.shape!r}")
    return [_Part(n, np.minimum(m, 1.0), override.get(n, c), s) for n, m, c, s in parts]


# Creature bodies are smaller than the object radius: decorations are scaled down on them.
CREATURE_DECORATION_SCALE = 0.7

# Border width as a fraction of the radius (thin shapes get thinner borders).
BORDER_WIDTH: dict[str, float] = {"ring": 0.09, "cross": 0.1}


def decoration_mask(
    kind: str, part: np.ndarray, cx: float, cy: float, r: float, side: int, shape: str = ""
) -> np.ndarray:
    """Mask of a decoration clipped to `part`, scaled by the object radius r (pixels)."""
    xs, ys = _grid(side)
    x, y = xs * side - cx, ys * side - cy
    if kind == "dots":
        period = 0.5 * r
        u = (x / period + 0.5) % 1 - 0.5
        v = (y / period + 0.5) % 1 - 0.5
        m = (u * u + v * v < 0.27**2).astype(np.float32)
    elif kind == "stripes":
        period = 0.55 * r
        m = ((x / period + 0.225) % 1 < 0.45).astype(np.float32)
    elif kind == "border":
        return part - erode(part, BORDER_WIDTH.get(shape, 0.18) * r)
    elif kind == "center":
        m = (x * x + y * y < (0.32 * r) ** 2).astype(np.float32)
    elif kind == "half":
        m = (y > 0).astype(np.float32)
    else:
        raise ValueError(f"unknown decoration {kind!r}")
    return m * part


def _styled_mask(mask: np.ndarray, style: Style, r: float, min_px: float) -> np.ndarray:
    """Apply a style's fill and outlines to one part mask."""
    xs, ys = _grid(mask.shape[0])
    side = mask.shape[0]
    if style.fill == "solid":
        fill = mask
    elif style.fill == "none":
        fill = np.zeros_like(mask)
    elif style.fill in ("hatch", "crosshatch"):
        period = max(0.3 * r, 3 * min_px) / side
        lines = ((xs + ys) / math.sqrt(2) / period) % 1 < 0.36
        if style.fill == "crosshatch":
            lines |= ((xs - ys) / math.sqrt(2) / period) % 1 < 0.36
        fill = mask * lines
    elif style.fill == "halftone":
        period = max(0.36 * r, 3 * min_px) / side
        u = (xs / period) % 1 - 0.5
        v = (ys / period) % 1 - 0.5
        fill = mask * (u * u + v * v < 0.36**2)
    else:
        raise ValueError(f"unknown fill {style.fill!r}")
    thickness = max(0.13 * r, 1.4 * min_px)
    inner = mask
    for _ in range(style.outlines):
        eroded = erode(inner, thickness)
        fill = np.maximum(fill, inner - eroded)
        inner = erode(eroded, thickness)  # gap before the next outline
    return fill.astype(np.float32)


def named_color_share(obj: ObjectSpec, style: Union[str, Style], size: int = 64) -> float:
    """Share of an object's colored area drawn in its named color (or that color's shade).

    The colored area is what carries the object's color: its body and body-colored parts, the
    decorations and recolored parts drawn over them. A creature's fixed-color details (legs,
    beak, eyes) are left out. Pixelated style is measured after the cells snap to a color.
    An undecorated object is 1.0 and a flat square with a "half" decoration 0.5. In outline
    style a border covers all that is drawn of a plain shape's body (0.0). Below 0.5 the
    caption's color is not the object's main color.
    """
    style = style_recipe(style)
    if not obj.decorations and not obj.part_colors:
        return 1.0  # one color (and its shade) is all there is
    side = size * SUPERSAMPLE
    named = {COLORS[obj.color], _shade(COLORS[obj.color])}
    other = {COLORS[d.color] for d in obj.decorations} | {COLORS[c] for _, c in obj.part_colors}
    other -= named
    if style.pixel_cells:  # every cell is one palette color: count the pixels of each
        color, alpha = _object_rgba(obj, style, side)
        drawn = alpha > 0.5
        rgb = np.rint(color[drawn] / alpha[drawn][:, None]).astype(int)
        areas = {c: float(np.all(rgb == c, axis=1).sum()) for c in named | other}
    else:  # each layer's area left visible by the layers drawn over it
        covered = np.zeros((side, side), np.float32)
        areas = dict.fromkeys(named | other, 0.0)
        for mask, rgb in reversed(_object_layers(obj, style, side)):  # topmost layer first
            visible = np.clip(mask, 0.0, 1.0) * (1.0 - covered)
            covered += visible
            if tuple(rgb) in areas:
                areas[tuple(rgb)] += float(visible.sum())
    total = sum(areas.values())
    return sum(areas[c] for c in named) / total if total else 0.0


def object_center_radius(obj: ObjectSpec, side: int) -> tuple[float, float, float]:
    """Centre (x, y) and radius of an object in pixels of a `side`-pixel canvas."""
    r = SIZES[obj.size] * side
    fx, fy = POSITIONS[obj.position]
    fx, fy = fx + obj.offset[0], fy + obj.offset[1]
    return fx * side, fy * side, r


def _object_layers(obj: ObjectSpec, style: Style, side: int) -> list[tuple[np.ndarray, RGB]]:
    """(mask, color) layers of an object after styling, in drawing order."""
    cx, cy, r = object_center_radius(obj, side)
    min_px = float(SUPERSAMPLE)  # one output pixel
    if obj.shape in CREATURES:
        parts = _creature_parts(obj, cx, cy, r, side)
    else:
        parts = [_Part("body", shape_mask(obj.shape, cx, cy, r, side), COLORS[obj.color])]
    layers: list[tuple[np.ndarray, RGB]] = []
    for part in parts:
        mask = _styled_mask(part.mask, style, r, min_px) if part.styled else part.mask
        layers.append((mask, part.color))
        if part.name == "body":
            ys, xs = np.nonzero(part.mask > 0.5)
            bx, by = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
            deco_r = r * (CREATURE_DECORATION_SCALE if obj.shape in CREATURES else 1.0)
            for d in obj.decorations:
                deco = decoration_mask(d.kind, part.mask, bx, by, deco_r, side, obj.shape)
                layers.append((deco, COLORS[d.color]))
    return layers


def background_array(background: Background, side: int) -> np.ndarray:
    """Background as a float32 (side, side, 3) RGB array."""
    xs, ys = _grid(side)
    base = np.asarray(background.base, np.float32)
    ink = np.asarray(background.ink, np.float32)
    p = background.period
    if background.pattern == "plain":
        m = np.zeros_like(xs)
    elif background.pattern == "stripes":
        coord = (xs + ys) / math.sqrt(2) if background.diagonal else ys
        m = ((coord / p) % 1 < 0.5).astype(np.float32)
    elif background.pattern == "dots":
        u = (xs / p) % 1 - 0.5
        v = (ys / p) % 1 - 0.5
        m = (u * u + v * v < 0.22**2).astype(np.float32)
    elif background.pattern == "checks":
        m = ((np.floor(xs / p) + np.floor(ys / p)) % 2).astype(np.float32)
    elif background.pattern == "grid":
        u = (xs / p + 0.06) % 1
        v = (ys / p + 0.06) % 1
        m = ((u < 0.12) | (v < 0.12)).astype(np.float32)
    elif background.pattern == "motifs":
        m = np.zeros_like(xs)
        n = int(round(1 / p))
        for j in range(n):
            for i in range(-1, n + 1):
                cx = (i + 0.5 + 0.5 * (j % 2)) * p * side
                cy = (j + 0.5) * p * side
                m = np.maximum(m, shape_mask(background.motif, cx, cy, background.motif_scale * p * side, side))
    else:
        raise ValueError(f"unknown pattern {background.pattern!r}")
    return base * (1 - m[..., None]) + ink * m[..., None]


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate an array by (dy, dx) pixels, filling with zeros."""
    out = np.zeros_like(a)
    h, w = a.shape[:2]
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _pixelate(
    color: np.ndarray,
    alpha: np.ndarray,
    palette: Sequence[RGB],
    cells: int,
    gaps: bool,
    center: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Snap premultiplied color + alpha to a cells x cells grid of palette colors with hard edges.

    The grid is shifted so that the object's centre falls on a cell centre (symmetric shapes
    stay symmetric).
    """
    side = alpha.shape[0]
    cell = side / cells
    dx, dy = (int(round((math.floor(c / cell) + 0.5) * cell - c)) for c in center)
    color, alpha = _shift(color, dy, dx), _shift(alpha, dy, dx)

    def resize(a: np.ndarray, n: int, method) -> np.ndarray:
        return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((n, n), method))

    small_a = resize(alpha, cells, Image.Resampling.BOX)
    small_c = np.stack([resize(color[..., k], cells, Image.Resampling.BOX) for k in range(3)], -1)
    unpremult = small_c / np.maximum(small_a, 1e-6)[..., None]
    colors = np.asarray(palette, np.float32)
    nearest = ((unpremult[:, :, None, :] - colors[None, None]) ** 2).sum(-1).argmin(-1)
    unpremult = colors[nearest]
    hard_a = (small_a >= 0.5).astype(np.float32)
    big_a = resize(hard_a, side, Image.Resampling.NEAREST)
    big_c = np.stack([resize(unpremult[..., k], side, Image.Resampling.NEAREST) for k in range(3)], -1)
    if gaps:
        xs, ys = _grid(side)
        gap = 0.2
        on_edge = ((xs * cells) % 1 < gap) | ((ys * cells) % 1 < gap)
        big_a = big_a * ~on_edge
    return _shift(big_c * big_a[..., None], -dy, -dx), _shift(big_a, -dy, -dx)


def _object_rgba(obj: ObjectSpec, style: Style, side: int) -> tuple[np.ndarray, np.ndarray]:
    """One styled object on a transparent `side`-pixel canvas: premultiplied color, alpha."""
    color = np.zeros((side, side, 3), np.float32)
    alpha = np.zeros((side, side), np.float32)
    layers = _object_layers(obj, style, side)
    for mask, rgb in layers:
        m = np.clip(mask, 0.0, 1.0)
        color = color * (1 - m[..., None]) + np.asarray(rgb, np.float32) * m[..., None]
        alpha = alpha * (1 - m) + m
    if style.pixel_cells:
        palette = [rgb for _, rgb in layers]
        cx, cy, _ = object_center_radius(obj, side)
        color, alpha = _pixelate(color, alpha, palette, style.pixel_cells, style.cell_gaps, (cx, cy))
    return color, alpha


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Render a scene to a `size` x `size` RGB image (deterministic)."""
    side = size * SUPERSAMPLE
    style = style_recipe(scene.style)
    canvas = background_array(background_recipe(scene.background), side)
    for obj in scene.objects:
        color, alpha = _object_rgba(obj, style, side)
        canvas = canvas * (1 - alpha[..., None]) + color
    img = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    return img.resize((size, size), Image.Resampling.LANCZOS)


def contact_sheet(
    images: Sequence[Image.Image], cols: int, pad: int = 2, fill: RGB = (255, 255, 255)
) -> Image.Image:
    """Tile equally sized images into a grid with `cols` columns and `pad` pixels of padding."""
    if not images:
        raise ValueError("no images")
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), fill)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        sheet.paste(img.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet


def without_offsets(scene: Scene) -> Scene:
    """The scene with every object's jitter removed (what a caption describes)."""
    return replace(scene, objects=tuple(replace(o, offset=(0.0, 0.0)) for o in scene.objects))
