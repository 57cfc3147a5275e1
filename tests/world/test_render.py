"""Tests for the tiny-world renderer, captions and sampler."""

import re
from dataclasses import replace

import numpy as np
import pytest

from cns.world.render import (
    AXIS_ALIGNED_SHAPES,
    BACKGROUNDS,
    COLORS,
    CREATURES,
    DECORATIONS,
    HELD_OUT_CLASS_BACKGROUND,
    HELD_OUT_CLASS_COLOR,
    OBJECT_CLASSES,
    PATTERNED_BACKGROUNDS,
    PLAIN_BACKGROUNDS,
    POSITIONS,
    MIN_NAMED_COLOR_SHARE,
    RESERVED_LOOKS,
    SHAPES,
    SIZES,
    STYLES,
    Decoration,
    ObjectSpec,
    Scene,
    caption,
    caption_words,
    contact_sheet,
    has_enough_contrast,
    is_held_out,
    is_legible,
    named_color_share,
    object_looks,
    parse_caption,
    render,
    sample_scene,
    uses_reserved_look,
    vocabulary_words,
    without_offsets,
)


def pixels(image):
    return np.asarray(image, dtype=np.float32)


def mean_abs_diff(a, b):
    return float(np.abs(pixels(a) - pixels(b)).mean())


@pytest.fixture(scope="module")
def train_scenes():
    rng = np.random.default_rng(7)
    return [sample_scene(rng, "train") for _ in range(2000)]


@pytest.fixture(scope="module")
def heldout_scenes():
    rng = np.random.default_rng(8)
    return [sample_scene(rng, "heldout") for _ in range(300)]


def base_scene():
    return Scene((ObjectSpec("star", "red", "big", "left"),), "gray", "flat")


def test_vocabulary_sizes():
    assert len(SHAPES) >= 8 and len(COLORS) >= 8 and len(CREATURES) >= 2
    assert set(SIZES) == {"small", "big"}
    assert {"left", "right", "center"} <= set(POSITIONS)
    assert PLAIN_BACKGROUNDS and PATTERNED_BACKGROUNDS
    assert len(STYLES) >= 4 and {"flat", "outline", "pixelated", "hatched"} <= set(STYLES)
    assert len(DECORATIONS) >= 4


def test_vocabulary_words_are_sorted_plain_lowercase_words():
    words = vocabulary_words()
    assert words == sorted(set(words))
    assert all(re.fullmatch(r"[a-z]+", w) for w in words)
    for group in (COLORS, OBJECT_CLASSES, SIZES, BACKGROUNDS, STYLES, DECORATIONS):
        assert set(group) <= set(words)


@pytest.mark.parametrize("size", [32, 64])
def test_same_seed_gives_identical_pixels(size):
    scenes_a = [sample_scene(np.random.default_rng(123)) for _ in range(3)]
    scenes_b = [sample_scene(np.random.default_rng(123)) for _ in range(3)]
    assert scenes_a == scenes_b
    for a, b in zip(scenes_a, scenes_b):
        img_a, img_b = render(a, size), render(b, size)
        assert img_a.size == (size, size) and img_a.mode == "RGB"
        assert img_a.tobytes() == img_b.tobytes()


def test_different_seeds_give_different_scenes():
    a = [sample_scene(np.random.default_rng(1)) for _ in range(5)]
    b = [sample_scene(np.random.default_rng(2)) for _ in range(5)]
    assert a != b


VARIANTS = {
    "shape": lambda s: replace(s, objects=(replace(s.objects[0], shape="heart"),)),
    "creature": lambda s: replace(s, objects=(replace(s.objects[0], shape="robot"),)),
    "color": lambda s: replace(s, objects=(replace(s.objects[0], color="blue"),)),
    "size": lambda s: replace(s, objects=(replace(s.objects[0], size="small"),)),
    "position": lambda s: replace(s, objects=(replace(s.objects[0], position="right"),)),
    "decoration": lambda s: replace(s, objects=(replace(s.objects[0], decorations=(Decoration("dots", "white"),)),)),
    "background": lambda s: replace(s, background="striped"),
    "style": lambda s: replace(s, style="outline"),
    "second object": lambda s: replace(s, objects=s.objects + (ObjectSpec("ring", "yellow", "small", "right"),)),
}


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("attribute", sorted(VARIANTS))
def test_changing_an_attribute_changes_the_image(attribute, size):
    scene = base_scene()
    assert mean_abs_diff(render(scene, size), render(VARIANTS[attribute](scene), size)) > 1.0


@pytest.mark.parametrize("size", [32, 64])
def test_every_style_and_background_renders_differently(size):
    scene = base_scene()
    styles = [pixels(render(replace(scene, style=s), size)) for s in STYLES]
    for i in range(len(styles)):
        for j in range(i + 1, len(styles)):
            assert np.abs(styles[i] - styles[j]).mean() > 0.5
    backgrounds = [pixels(render(replace(scene, background=b), size)) for b in BACKGROUNDS]
    for i in range(len(backgrounds)):
        for j in range(i + 1, len(backgrounds)):
            assert np.abs(backgrounds[i] - backgrounds[j]).mean() > 2.0


@pytest.mark.parametrize("size", [32, 64])
def test_flat_object_has_its_color_at_its_position(size):
    img = pixels(render(Scene((ObjectSpec("circle", "red", "big", "left"),), "gray", "flat"), size))
    cx, cy = (int(f * size) for f in POSITIONS["left"])
    assert np.abs(img[cy, cx] - COLORS["red"]).max() < 6
    assert np.abs(img[cy, size - 1 - cx] - BACKGROUNDS["gray"].base).max() < 6


def test_supersampling_antialiases_edges():
    img = pixels(render(Scene((ObjectSpec("circle", "white", "big", "center"),), "navy", "flat"), 64))
    # Edge pixels blend object and background: many intermediate gray levels.
    assert len(np.unique(img[..., 0])) > 10


def test_pixelated_style_has_blocky_edges():
    scene = Scene((ObjectSpec("circle", "white", "big", "center"),), "navy", "flat")
    flat = pixels(render(scene, 64))[..., 0]
    pix = pixels(render(replace(scene, style="pixelated"), 64))[..., 0]
    # A pixelated circle has long straight edge runs: fewer distinct row profiles.
    assert len({tuple(r > 128) for r in pix}) < len({tuple(r > 128) for r in flat})


def _flat_and_pixelated_masks(shape, size, position):
    scene = Scene((ObjectSpec(shape, "white", size, position),), "navy", "flat")
    return [pixels(render(replace(scene, style=style), 64))[..., 0] > 128 for style in ("flat", "pixelated")]


def _profiles(mask):
    """Distinct non-empty row and column patterns, and the bounding box's width and height."""
    rows, cols = {tuple(r) for r in mask if r.any()}, {tuple(c) for c in mask.T if c.any()}
    xs, ys = np.nonzero(mask.any(0))[0], np.nonzero(mask.any(1))[0]
    return len(rows), len(cols), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


@pytest.mark.parametrize("size", ["small", "big"])
@pytest.mark.parametrize("position", ["left", "center"])
def test_pixelation_keeps_axis_aligned_outlines(size, position):
    assert set(AXIS_ALIGNED_SHAPES) == {"square", "cross"}
    cell = 64 / STYLES["pixelated"].pixel_cells
    # a square stays a rectangle (one row and one column pattern) whose sides snap by under a cell
    flat, pix = (_profiles(m) for m in _flat_and_pixelated_masks("square", size, position))
    assert flat[:2] == pix[:2] == (1, 1)
    assert abs(flat[2] - pix[2]) <= cell and abs(flat[3] - pix[3]) <= cell
    # a cross stays a few bars (a snapped arm can leave one step)
    flat, pix = (_profiles(m) for m in _flat_and_pixelated_masks("cross", size, position))
    assert max(flat[:2]) <= 4 and max(pix[:2]) <= 5
    assert abs(flat[2] - pix[2]) <= cell and abs(flat[3] - pix[3]) <= cell
    # curved and slanted outlines turn into a few steps
    for shape in ("circle", "diamond", "star"):
        flat, pix = (_profiles(m) for m in _flat_and_pixelated_masks(shape, size, position))
        assert min(flat[:2]) >= 6 and max(pix[:2]) < min(flat[:2]), (shape, flat, pix)


def test_named_color_share():
    plain = ObjectSpec("square", "red", "big", "center")
    for style in STYLES:
        assert named_color_share(plain, style) == pytest.approx(1.0)
    half = replace(plain, decorations=(Decoration("half", "blue"),))
    assert named_color_share(half, "flat") == pytest.approx(0.5, abs=0.02)
    dots = replace(plain, decorations=(Decoration("dots", "blue"),))
    assert 0.6 < named_color_share(dots, "flat") < 1.0
    # a border covers the outline, which is all that outline style draws of the body
    border = replace(plain, decorations=(Decoration("border", "blue"),))
    assert named_color_share(border, "outline") == 0.0 and named_color_share(border, "flat") > 0.5
    # pixelated: measured after the cells snap to one color each (a small object's stripes thin out)
    stripes = replace(plain, size="small", decorations=(Decoration("stripes", "blue"),))
    assert named_color_share(stripes, "pixelated") > named_color_share(stripes, "flat") + 0.15
    # a creature's shaded parts count as its color, its fixed-color legs, beak and eyes not at all
    for creature in ("bird", "fish", "robot"):
        assert named_color_share(replace(plain, shape=creature), "flat") == pytest.approx(1.0)
    recolored = replace(plain, shape="bird", part_colors=(("wing", "blue"), ("head", "blue")))
    assert 0.5 < named_color_share(recolored, "flat") < 0.9


def test_is_legible():
    square = Scene((ObjectSpec("square", "red", "big", "center"),), "gray", "flat")
    circle = replace(square, objects=(ObjectSpec("circle", "red", "big", "center"),))

    def decorated(scene, kind):
        return replace(scene, objects=(replace(scene.objects[0], decorations=(Decoration(kind, "blue"),)),))

    # a pixelated square shows no pixels, nor does one with stripes; round dots and circles do
    pixelated = replace(square, style="pixelated")
    for scene in (pixelated, decorated(pixelated, "stripes")):
        assert not is_legible(scene)
    for scene in (square, replace(square, style="outline"), replace(circle, style="pixelated"),
                  decorated(pixelated, "dots")):
        assert is_legible(scene)
    # a blue border is all that outline style draws of a red square
    bordered = decorated(square, "border")
    assert is_legible(bordered) and not is_legible(replace(bordered, style="outline"))
    # an unnamed pixel-cell style names no style to hide
    assert is_legible(replace(square, style=STYLES["pixelated"]))


def test_sampled_scenes_are_legible():
    """The sampler draws only scenes whose render shows their caption; legible=False draws the rest too."""
    rng = np.random.default_rng(7)
    old = [sample_scene(rng, "train", legible=False) for _ in range(300)]
    rng = np.random.default_rng(7)
    new = [sample_scene(rng, "train") for _ in range(300)]
    assert all(is_legible(s) for s in new)
    hidden = [s for s in old if not is_legible(s)]
    assert 0.05 < len(hidden) / len(old) < 0.4
    assert any(s.style == "pixelated" for s in hidden)  # pixelated squares
    assert any(min(named_color_share(o, s.style) for o in s.objects) < MIN_NAMED_COLOR_SHARE for s in hidden)
    # a two-object pixelated scene shows its style if either object steps
    square = ObjectSpec("square", "red", "big", "left")
    pair = Scene((square, replace(square, shape="circle", position="right")), "gray", "pixelated")
    assert is_legible(pair) and not is_legible(replace(pair, objects=(square, replace(square, position="right"))))


def test_caption_example():
    scene = Scene(
        (
            ObjectSpec("star", "red", "small", "left"),
            ObjectSpec("ring", "blue", "big", "right", (Decoration("border", "orange"),)),
        ),
        "striped",
        "outline",
    )
    assert caption(scene) == (
        "a small red star on the left and a big blue ring with an orange border on the right,"
        " on a striped background, outline style"
    )
    decorations = (Decoration("dots", "yellow"), Decoration("center", "white"))
    two_decorations = ObjectSpec("heart", "purple", "big", "top", decorations)
    assert caption(Scene((two_decorations,), "navy", "hatched")).startswith(
        "a big purple heart with yellow dots and a white center at the top,"
    )


def test_captions_parse_back(train_scenes, heldout_scenes):
    for scene in train_scenes[:500] + heldout_scenes[:100]:
        objects, background, style = parse_caption(caption(scene))
        assert objects == without_offsets(scene).objects
        assert (background, style) == (scene.background, scene.style)


@pytest.mark.parametrize(
    "bad",
    [
        "a small red star on the left, on a gray background",
        "a tiny red star on the left, on a gray background, flat style",
        "a small red star on the left, on a purple background, flat style",
        "a small red star, on a gray background, flat style",
        "a small red star with red sparkles on the left, on a gray background, flat style",
    ],
)
def test_parse_caption_rejects_malformed_captions(bad):
    with pytest.raises(ValueError):
        parse_caption(bad)


def test_caption_words_are_in_vocabulary(train_scenes, heldout_scenes):
    vocab = set(vocabulary_words())
    used = set()
    for scene in train_scenes + heldout_scenes:
        used |= set(caption_words(caption(scene)))
    assert used <= vocab
    assert "," not in "".join(used)
    # Sampling exercises (almost) the whole vocabulary.
    assert len(vocab - used) <= 1, vocab - used


def test_train_split_never_holds_out_combos(train_scenes):
    assert not any(is_held_out(s) for s in train_scenes)
    pairs = {(o.shape, o.color) for s in train_scenes for o in s.objects}
    assert not pairs & HELD_OUT_CLASS_COLOR
    bg_pairs = {(o.shape, s.background) for s in train_scenes for o in s.objects}
    assert not bg_pairs & HELD_OUT_CLASS_BACKGROUND
    # ...while the attributes themselves are all seen in train.
    assert {o.shape for s in train_scenes for o in s.objects} == set(OBJECT_CLASSES)
    assert {o.color for s in train_scenes for o in s.objects} == set(COLORS)


def test_heldout_split_always_holds_out_a_combo(heldout_scenes):
    assert all(is_held_out(s) for s in heldout_scenes)
    assert is_held_out(Scene((ObjectSpec("star", "green"),), "gray"))
    assert is_held_out(Scene((ObjectSpec("star", "red"),), "checkered"))
    assert not is_held_out(Scene((ObjectSpec("star", "red"),), "gray"))


def test_samplers_avoid_reserved_looks_and_low_contrast(train_scenes, heldout_scenes):
    for scene in train_scenes + heldout_scenes:
        assert not uses_reserved_look(scene)
        assert has_enough_contrast(scene)
        for obj in scene.objects:
            assert len(obj.decorations) <= 1 and not obj.part_colors and not obj.personal
    decorated = [o for s in train_scenes for o in s.objects if o.decorations]
    assert len(decorated) > 500  # decorations are part of pretraining
    assert uses_reserved_look(Scene((ObjectSpec("heart", "purple", decorations=(Decoration("dots", "yellow"),)),)))
    assert object_looks(ObjectSpec("star", "red", decorations=(Decoration("dots", "white"),))) == {
        ("star", "red", "dots", "white")
    }
    assert all(look[0] in OBJECT_CLASSES for look in RESERVED_LOOKS)


def test_sample_scene_options():
    rng = np.random.default_rng(0)
    two = [sample_scene(rng, n_objects=2, backgrounds=("navy",), styles=("flat",)) for _ in range(20)]
    assert all(len(s.objects) == 2 and s.background == "navy" and s.style == "flat" for s in two)
    assert all(s.objects[0].position != s.objects[1].position for s in two)
    with pytest.raises(ValueError):
        sample_scene(rng, "test")


def test_contact_sheet_layout():
    images = [render(base_scene(), 32) for _ in range(5)]
    sheet = contact_sheet(images, cols=3, pad=2)
    assert sheet.size == (3 * 34 + 2, 2 * 34 + 2)
    assert pixels(sheet)[2:34, 2:34].tobytes() == pixels(images[0]).tobytes()


@pytest.mark.parametrize("half", [0, 1, 3])
def test_square_min_filter_is_the_minimum_over_each_pixels_square_with_zeros_outside(half):
    from cns.world.render import _min_filter_square

    mask = np.random.default_rng(half).random((7, 9)).astype(np.float32) + 0.5
    padded = np.pad(mask, half)  # outside the canvas counts as empty (0)
    expected = np.array([[padded[y: y + 2 * half + 1, x: x + 2 * half + 1].min() for x in range(9)]
                         for y in range(7)])
    out = _min_filter_square(mask, half)
    assert out.shape == mask.shape and np.array_equal(out, expected)
    if half:
        assert out[0, 0] == 0 and out[3, 4] > 0  # the border erodes, the middle keeps its neighbourhood's minimum
