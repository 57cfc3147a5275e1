"""Unnamed style and background recipes: appearance primitives without a vocabulary word.

Personal concepts are new combinations of seen parts (a user's dog is a new dog), so the
world's models must have seen every primitive a concept is made of: halftone and crosshatch
fills, double outlines, pixel cells with gaps, high-contrast stripes, checks and motif fields.
The named styles and backgrounds do not show them all; these samplers do, in recipes that are
never a personal concept's own. The evaluator trains on them (``cns.world.evaluator``), and the
generator's pretraining pool holds a share of them, captioned ``on a background`` / ``style``
(``cns.world.dataset.pool_scenes``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .render import BACKGROUNDS, COLORS, PLAIN_BACKGROUNDS, SHAPES, STYLES, Background, Style, color_distance

__all__ = ["PALETTE", "PATTERNS", "PERIODS", "PIXEL_CELLS", "STYLE_FILLS", "sample_novel_background",
           "sample_novel_style"]

# Colors that unnamed background recipes use (the 8 color words and the plain backgrounds).
PALETTE: tuple[tuple[int, int, int], ...] = tuple(COLORS.values()) + tuple(BACKGROUNDS[k].base for k in PLAIN_BACKGROUNDS)
STYLE_FILLS: tuple[str, ...] = ("solid", "none", "hatch", "crosshatch", "halftone")
PIXEL_CELLS: tuple[int, ...] = (12, 14, 16, 18, 20, 24)
PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots", "checks", "grid", "motifs")
PERIODS: tuple[float, ...] = (1 / 4, 1 / 5, 1 / 6, 1 / 8, 1 / 10)


@lru_cache(maxsize=1)
def _concept_recipes() -> tuple[frozenset, frozenset]:
    """The personal concepts' style and background recipes (``CONCEPTS`` is a constant tuple,
    so they are gathered once, not on every draw)."""
    from .concepts import CONCEPTS

    return (frozenset(c.style for c in CONCEPTS if c.style is not None),
            frozenset(c.background for c in CONCEPTS if c.background is not None))


def sample_novel_style(rng: np.random.Generator) -> Style:
    """An unnamed style recipe: not a base style and not a personal concept's recipe."""
    concept_styles, _ = _concept_recipes()
    while True:
        pixel = int(rng.choice(PIXEL_CELLS)) if rng.random() < 0.35 else 0
        style = Style(
            fill=str(rng.choice(STYLE_FILLS)),
            outlines=int(rng.integers(3)),
            pixel_cells=pixel,
            cell_gaps=bool(pixel and rng.random() < 0.5),
        )
        if style.fill == "none" and style.outlines == 0:
            continue
        if style in STYLES.values() or style in concept_styles:
            continue
        return style


def _colour_pair(background: Background) -> frozenset:
    return frozenset((background.base, background.ink))


def sample_novel_background(rng: np.random.Generator, avoid_concept_colours: bool = False) -> Background:
    """An unnamed background recipe: not a base background and not a personal concept's recipe.

    ``avoid_concept_colours`` also rules out a concept's pattern in its two colours at any
    period or angle (navy and beige stripes, red and white checks, ...): the pattern and the
    colour pair are each seen, their combination stays the concept's own."""
    _, concept_backgrounds = _concept_recipes()
    near = {(b.pattern, _colour_pair(b)) for b in concept_backgrounds} if avoid_concept_colours else set()
    while True:
        pattern = str(rng.choice(PATTERNS))
        base = PALETTE[int(rng.integers(len(PALETTE)))]
        ink = PALETTE[int(rng.integers(len(PALETTE)))]
        if pattern == "plain":
            ink = (0, 0, 0)
        elif color_distance(base, ink) < 60:
            continue
        background = Background(
            pattern=pattern,
            base=base,
            ink=ink,
            period=float(rng.choice(PERIODS)) if pattern != "plain" else 1 / 8,
            diagonal=bool(pattern == "stripes" and rng.random() < 0.5),
            motif=str(rng.choice(SHAPES)) if pattern == "motifs" else "star",
            motif_scale=float(rng.choice((0.26, 0.4))) if pattern == "motifs" else 0.26,
        )
        if background in BACKGROUNDS.values() or background in concept_backgrounds:
            continue
        if (background.pattern, _colour_pair(background)) in near:
            continue
        return background
