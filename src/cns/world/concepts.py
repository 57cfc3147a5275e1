"""Personal concepts of the tiny world: objects, creatures, styles and scenes never shown in pretraining.

Each concept is a new combination of parts the base world shows (shapes, colors,
decorations, creature parts, style and background primitives). `make_concept_images`
returns a few "user photos" of a concept with captions that use its class word in
place of a personal token (`insert_token` puts one in); `write_all_concepts` writes
them to disk (also `python -m cns.world.concepts OUT_DIR`).
"""

from __future__ import annotations

import argparse
import json
import re
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from cns.world.render import (
    BACKGROUNDS,
    OBJECT_CLASSES,
    POSITION_PAIRS,
    STYLES,
    Background,
    Decoration,
    ObjectSpec,
    Scene,
    Style,
    caption,
    has_enough_contrast,
    is_held_out,
    render,
    sample_object,
    uses_reserved_look,
)

KINDS: tuple[str, ...] = ("object", "creature", "style", "scene")
MIN_IMAGES, MAX_IMAGES = 3, 6

# Per-example layout (index 0..5): subject size, whether a context object is added, and
# (for object / creature concepts) the style, mostly flat so the identity stays readable.
_EXAMPLE_SIZES: tuple[str, ...] = ("big", "small", "big", "big", "small", "big")
_EXAMPLE_CONTEXT: tuple[bool, ...] = (False, True, True, False, True, False)
_EXAMPLE_STYLES: tuple[str, ...] = ("flat", "flat", "flat", "outline", "flat", "hatched")
_POSITION_ORDER: tuple[str, ...] = ("left", "top", "right", "center", "bottom")


@dataclass(frozen=True)
class Concept:
    """A personal concept: name (slug), kind, class word and what makes it unique.

    Object and creature concepts carry a `subject` template (size/position are set per
    example); style concepts a `style` recipe; scene concepts a `background` recipe.
    """

    name: str
    kind: str  # object | creature | style | scene
    class_word: str  # shape / creature word, "style" or "background"
    description: str
    subject: Optional[ObjectSpec] = None
    style: Optional[Style] = None
    background: Optional[Background] = None

    def example_scene(self, rng: np.random.Generator, index: int = 0) -> Scene:
        """A scene showing the concept; `index` varies layout (size, position, context)."""
        return _example_scene(self, rng, index)

    def render(self, rng: np.random.Generator, index: int = 0, size: int = 64) -> tuple[Image.Image, str]:
        """One example image of the concept and its caption (class word, no personal token)."""
        scene = self.example_scene(rng, index)
        return render(scene, size), caption(scene)


def _subject(
    shape: str, color: str, *decorations: tuple[str, str], parts: tuple[tuple[str, str], ...] = ()
) -> ObjectSpec:
    """A personal object template (size and position are set per example image)."""
    return ObjectSpec(
        shape,
        color,
        decorations=tuple(Decoration(k, c) for k, c in decorations),
        part_colors=parts,
        personal=True,
    )


CONCEPTS: tuple[Concept, ...] = (
    # --- objects: a shape with two decorations in a color scheme pretraining never shows
    Concept("berry-heart", "object", "heart", "a purple heart with yellow dots and a white border",
            subject=_subject("heart", "purple", ("dots", "yellow"), ("border", "white"))),
    Concept("tiger-star", "object", "star", "an orange star with black stripes and a white center",
            subject=_subject("star", "orange", ("stripes", "black"), ("center", "white"))),
    Concept("ocean-ring", "object", "ring", "a blue ring with white dots and a yellow border",
            subject=_subject("ring", "blue", ("dots", "white"), ("border", "yellow"))),
    Concept("beach-ball", "object", "circle", "a yellow circle with red stripes and a black border",
            subject=_subject("circle", "yellow", ("stripes", "red"), ("border", "black"))),
    Concept("mint-gem", "object", "diamond", "a green diamond with white stripes and an orange center",
            subject=_subject("diamond", "green", ("stripes", "white"), ("center", "orange"))),
    # --- creatures: one specific individual of a creature class
    Concept("bolt-robot", "creature", "robot",
            "a blue robot with orange dots, an orange head and arms and a yellow antenna tip",
            subject=_subject("robot", "blue", ("dots", "orange"),
                             parts=(("head", "orange"), ("arms", "orange"), ("tip", "yellow")))),
    Concept("pip-bird", "creature", "bird", "a red bird with a white belly, a black head and a yellow wing",
            subject=_subject("bird", "red", ("half", "white"), parts=(("head", "black"), ("wing", "yellow")))),
    Concept("clown-fish", "creature", "fish", "an orange fish with white stripes, a black border and black fins",
            subject=_subject("fish", "orange", ("stripes", "white"), ("border", "black"),
                             parts=(("tail", "black"), ("fin", "black")))),
    # --- styles: a new combination of fill / outline / pixel primitives
    Concept("mosaic", "style", "style", "objects snapped to a coarse grid of tiles with gaps between them",
            style=Style(fill="solid", pixel_cells=16, cell_gaps=True)),
    Concept("double-line", "style", "style", "objects drawn as two concentric outlines",
            style=Style(fill="none", outlines=2)),
    Concept("halftone", "style", "style", "objects filled with a grid of dots, no outline",
            style=Style(fill="halftone")),
    Concept("crosshatch", "style", "style", "objects filled with crossed diagonal lines and an outline",
            style=Style(fill="crosshatch", outlines=1)),
    # --- scenes: a unique background
    Concept("harbor-stripes", "scene", "background", "wide diagonal navy and beige stripes",
            background=Background("stripes", (30, 40, 90), (225, 210, 175), period=1 / 5, diagonal=True)),
    Concept("picnic-cloth", "scene", "background", "large red and white checks",
            background=Background("checks", (245, 245, 245), (220, 40, 40), period=1 / 5)),
    Concept("starry-night", "scene", "background", "small yellow stars on navy",
            background=Background("motifs", (30, 40, 90), (250, 215, 30), period=1 / 4, motif="star")),
    Concept("bubble-wall", "scene", "background", "white rings on pink",
            background=Background("motifs", (240, 195, 210), (248, 248, 248), period=1 / 4, motif="ring",
                                  motif_scale=0.4)),
)


def get_concept(name: str) -> Concept:
    """The concept with this name."""
    for c in CONCEPTS:
        if c.name == name:
            return c
    raise KeyError(name)


def concepts_of_kind(kind: str) -> list[Concept]:
    """All concepts of one kind."""
    return [c for c in CONCEPTS if c.kind == kind]


def concept_rng(concept: Concept, seed: int = 0) -> np.random.Generator:
    """Generator for a concept's examples, stable across runs and concept order."""
    return np.random.default_rng([seed, zlib.crc32(concept.name.encode())])


def _context_is_valid(scene: Scene) -> bool:
    context = Scene(tuple(o for o in scene.objects if not o.personal), scene.background, scene.style)
    return has_enough_contrast(scene) and not uses_reserved_look(context) and not is_held_out(context)


def _example_scene(concept: Concept, rng: np.random.Generator, index: int) -> Scene:
    # Layout varies with the index: size, position (rotating from a per-concept start),
    # and a second (context) object on some images.
    start = zlib.crc32(concept.name.encode())
    position = _POSITION_ORDER[(start + index) % len(_POSITION_ORDER)]
    size = _EXAMPLE_SIZES[index % len(_EXAMPLE_SIZES)]
    with_context = _EXAMPLE_CONTEXT[index % len(_EXAMPLE_CONTEXT)]
    if with_context:
        position = "left" if position == "center" else position
        positions = next(p for p in POSITION_PAIRS if p[0] == position)
    else:
        positions = (position,)
    classes = [c for c in OBJECT_CLASSES if c != concept.class_word]
    for _ in range(10_000):
        if concept.style is not None:
            style: str | Style = concept.style
        elif concept.subject is not None:
            style = _EXAMPLE_STYLES[index % len(_EXAMPLE_STYLES)]
        else:
            style = str(rng.choice(list(STYLES)))
        background: str | Background = concept.background or str(rng.choice(list(BACKGROUNDS)))
        objects: list[ObjectSpec] = []
        if concept.subject is not None:
            jitter = (float(rng.uniform(-0.02, 0.02)), float(rng.uniform(-0.02, 0.02)))
            objects.append(replace(concept.subject, size=size, position=position, offset=jitter))
        if with_context or concept.subject is None:
            for p in positions[len(objects):]:
                objects.append(sample_object(rng, p, classes=classes, size=None if objects else size))
            if rng.random() < 0.5:  # context objects may come first in the caption
                objects.reverse()
        scene = Scene(tuple(objects), background, style)
        if _context_is_valid(scene):
            return scene
    raise RuntimeError(f"no valid example scene for {concept.name}")


def make_concept_images(
    concept: Concept, n: int = 5, size: int = 64, seed: int = 0
) -> list[tuple[Image.Image, str]]:
    """n (3..6) example images of a concept with captions using its class word."""
    if not MIN_IMAGES <= n <= MAX_IMAGES:
        raise ValueError(f"n must be in [{MIN_IMAGES}, {MAX_IMAGES}], got {n}")
    rng = concept_rng(concept, seed)
    return [concept.render(rng, i, size) for i in range(n)]


def concept_scenes(concept: Concept, n: int = 5, seed: int = 0) -> list[Scene]:
    """The scenes behind `make_concept_images` (same seed, same scenes)."""
    rng = concept_rng(concept, seed)
    return [concept.example_scene(rng, i) for i in range(n)]


def insert_token(text: str, concept: Concept, token: str) -> str:
    """Put a personal token before the class word: 'a big star' -> 'a big <tok> star'."""
    new, count = re.subn(rf"\b{re.escape(concept.class_word)}\b", f"{token} {concept.class_word}", text, count=1)
    if count != 1:
        raise ValueError(f"class word {concept.class_word!r} not in caption {text!r}")
    return new


def concept_metadata(concept: Concept) -> dict:
    """The JSON-able description written to concept.json."""
    return {
        "name": concept.name,
        "kind": concept.kind,
        "class_word": concept.class_word,
        "description": concept.description,
    }


def write_concept_folder(concept: Concept, out_dir: str | Path, n: int = 5, size: int = 64, seed: int = 0) -> Path:
    """Write NN.png images, captions.json (file name -> caption) and concept.json to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i, (image, text) in enumerate(make_concept_images(concept, n, size, seed)):
        name = f"{i:02d}.png"
        image.save(out / name)
        captions[name] = text
    (out / "captions.json").write_text(json.dumps(captions, indent=2) + "\n")
    (out / "concept.json").write_text(json.dumps(concept_metadata(concept), indent=2) + "\n")
    return out


def write_all_concepts(out_dir: str | Path, n: int = 5, size: int = 64, seed: int = 0) -> list[Path]:
    """Write every concept into its own subfolder `out_dir/<name>`."""
    return [write_concept_folder(c, Path(out_dir) / c.name, n, size, seed) for c in CONCEPTS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the tiny world's personal concept images.")
    parser.add_argument("out_dir", help="folder that receives one subfolder per concept")
    parser.add_argument("--n", type=int, default=5, help="images per concept (3-6)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folders = write_all_concepts(args.out_dir, args.n, args.size, args.seed)
    print(f"wrote {len(folders)} concepts to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
