"""Pretraining data: pools are deterministic; captions drop attributes but keep the grammar."""

import numpy as np

from cns.world.dataset import pool_scenes, training_caption
from cns.world.render import caption, caption_words, is_held_out, vocabulary_words


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
