"""Pretraining data: pools are deterministic; captions drop attributes but keep the grammar."""

import numpy as np

from cns.world.concepts import CONCEPTS
from cns.world.dataset import CHUNK, pool_scenes, training_caption
from cns.world.render import (BACKGROUNDS, STYLES, Background, Style, caption, caption_words, has_enough_contrast,
                              is_held_out, is_legible, sample_scene, uses_reserved_look,
                              vocabulary_words)


def test_pool_scenes_are_a_pure_function_of_seed_and_chunk():
    assert pool_scenes(3, 1) == pool_scenes(3, 1)
    assert pool_scenes(3, 1) != pool_scenes(3, 2)
    assert not any(is_held_out(s) for s in pool_scenes(0, 0))


def test_training_caption_without_dropping_is_the_caption():
    for scene in pool_scenes(0, 0)[:50]:
        assert training_caption(scene, np.random.default_rng(0), drop=0.0) == caption(scene)


def test_training_caption_drops_attributes_and_keeps_known_words():
    rng = np.random.default_rng(1)
    scenes = pool_scenes(0, 0)[:200]
    captions = [training_caption(s, rng, drop=0.3) for s in scenes]
    words = set(vocabulary_words())
    assert all(set(caption_words(c)) <= words for c in captions)
    full = [caption(s) for s in scenes]
    assert sum(c != f for c, f in zip(captions, full)) > 100  # most lose something at drop=0.3
    assert any(", on a background," in c for c in captions)  # the slot a personal scene fills
    assert any(c.endswith(", style") for c in captions)  # the slot a personal style fills
    assert not any(" a orange" in c or " a unknown" in c or c.startswith("a orange") for c in captions)


def test_pool_without_unnamed_recipes_is_the_named_sampler():
    rng = np.random.default_rng([3, 1, 0])
    assert pool_scenes(3, 1) == [sample_scene(rng, "train") for _ in range(CHUNK)]


def test_shipped_pretraining_pool_is_the_sampler_before_the_legibility_rule(tmp_path, monkeypatch):
    """The shipped model's pool also holds scenes whose render hides their caption (TinyWorldConfig.legible
    is False); --legible pools hold none, in their own folder."""
    import cns.world.dataset as dataset
    from cns.world.pretrain import TinyWorldConfig

    rng = np.random.default_rng([3, 1, 0])
    old = pool_scenes(3, 1, legible=False)
    assert old == [sample_scene(rng, "train", legible=False) for _ in range(CHUNK)]
    assert 0.05 * CHUNK < sum(not is_legible(s) for s in old) < 0.4 * CHUNK
    assert all(is_legible(s) for s in pool_scenes(3, 1, legible=True))
    folders = []
    monkeypatch.setattr(dataset, "render_chunks", lambda folder, *args, **kwargs: folders.append(folder.name))
    for legible in (TinyWorldConfig().legible, True):
        dataset.render_pool(10, cache_dir=tmp_path, legible=legible)
    assert folders == ["pool-train-seed0-64px", "pool-train-seed0-64px-legible"]


def test_pool_shows_unnamed_recipes_but_never_a_concepts_own():
    scenes = pool_scenes(0, 0, novel_background=0.3, novel_style=0.3)
    unnamed_backgrounds = [s.background for s in scenes if isinstance(s.background, Background)]
    unnamed_styles = [s.style for s in scenes if isinstance(s.style, Style)]
    assert 0.15 * CHUNK < len(unnamed_backgrounds) < 0.35 * CHUNK  # some redrawn for contrast
    assert 0.2 * CHUNK < len(unnamed_styles) < 0.4 * CHUNK
    assert not any(b in BACKGROUNDS.values() for b in unnamed_backgrounds)
    assert not any(s in STYLES.values() for s in unnamed_styles)
    concept_styles = {c.style for c in CONCEPTS if c.style}
    concept_backgrounds = [c.background for c in CONCEPTS if c.background]
    assert not set(unnamed_styles) & concept_styles
    for b in unnamed_backgrounds:  # neither the recipe nor its pattern in the concept's two colours
        assert not any(b.pattern == c.pattern and {b.base, b.ink} == {c.base, c.ink} for c in concept_backgrounds)
    # the primitives concepts are made of are all there
    assert {s.fill for s in unnamed_styles} >= {"halftone", "crosshatch", "none"}
    assert any(s.outlines == 2 for s in unnamed_styles) and any(s.cell_gaps for s in unnamed_styles)
    assert {b.pattern for b in unnamed_backgrounds} >= {"stripes", "checks", "motifs"}
    assert all(has_enough_contrast(s) and not is_held_out(s) and not uses_reserved_look(s) for s in scenes)
    rng = np.random.default_rng(0)
    captions = [training_caption(s, rng, drop=0.0) for s in scenes]
    assert all(set(caption_words(c)) <= set(vocabulary_words()) for c in captions)
    assert sum(", on a background" in c for c in captions) == len(unnamed_backgrounds)
    assert sum(c.endswith(", style") for c in captions) == len(unnamed_styles)


def test_unnamed_backgrounds_can_avoid_the_concepts_colour_pairs():
    from cns.world.recipes import sample_novel_background

    pairs = {(c.background.pattern, frozenset((c.background.base, c.background.ink)))
             for c in CONCEPTS if c.background}
    rng = np.random.default_rng(0)
    free = [sample_novel_background(rng) for _ in range(3000)]
    rng = np.random.default_rng(0)
    avoiding = [sample_novel_background(rng, avoid_concept_colours=True) for _ in range(3000)]
    assert any((b.pattern, frozenset((b.base, b.ink))) in pairs for b in free)  # the restriction has work to do
    assert not any((b.pattern, frozenset((b.base, b.ink))) in pairs for b in avoiding)
