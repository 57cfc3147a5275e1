"""Fixtures of the evaluation tests: a tiny random CLIP scorer, dummy concepts of three kinds,
and a micro-protocol sized for the dummy pipeline (16 x 16 images, a few steps)."""

from __future__ import annotations

import pytest

from cns.evaluation.protocol import EvalConcept, Protocol
from cns.evaluation.run import ZeroShotSet

DUMMY_TEMPLATES = {
    "object": ("a photo of a {token} {word}", "a {token} {word} in the city"),
    "creature": ("a photo of a {token} {word}", "a {token} {word} on the beach"),
    "style": ("a dog, {token} {word}", "a house, {token} {word}"),
    "scene": ("a cat on a {token} {word}", "a car on a {token} {word}"),
}
DUMMY_CLASS_PROMPTS = {"object": "a photo of a {word}", "creature": "a photo of a {word}",
                       "style": "a dog, {word}", "scene": "a cat on a {word}"}


def micro_protocol(n_concepts: int = 3, **overrides) -> Protocol:
    names = ["c0", "c1", "c2"][:n_concepts]
    settings = dict(name="micro", sets=[names], single_prompts_per_concept=2, multi_prompts_per_set=2,
                    images_per_prompt=2, reference_images=3, zero_shot_prompts=2, steps=3, batch_size=1,
                    lr_embedding=1e-2, lr_neurons=1e-2, lr_lora=1e-2, lora_rank=2, num_class_images=2,
                    sample_steps=2, guidance=2.0, templates=dict(DUMMY_TEMPLATES),
                    class_prompts=dict(DUMMY_CLASS_PROMPTS))
    settings.update(overrides)
    return Protocol(**settings)


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    """A tiny random CLIPModel + processor saved to a folder (16 x 16 images, 8-d embeddings)."""
    from cns.testing import DUMMY_WORDS, save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("eval-clip") / "tiny", list(DUMMY_WORDS) + [","])


@pytest.fixture(scope="session")
def tiny_scorer(tiny_clip_path):
    from cns.evaluation import ClipScorer

    return ClipScorer.from_pretrained(tiny_clip_path, device="cpu")


@pytest.fixture(scope="session")
def dummy_concepts(concept_folders):
    kinds = [("c0", "object", "dog"), ("c1", "style", "style"), ("c2", "scene", "background")]
    return {name: EvalConcept(name, kind, word, images=str(folder))
            for (name, kind, word), folder in zip(kinds, concept_folders)}


@pytest.fixture(scope="session")
def dummy_zero_shot():
    return ZeroShotSet(
        prompts=["a photo of a red car", "a blue house"],
        labels=[{"color": "red"}, {"color": "blue"}],
        candidates={"color": (["red", "blue"], ["a red car", "a blue car"])},
    )


@pytest.fixture(scope="session")
def world_words_model(tmp_path_factory):
    """The dummy pipeline with the tiny world's words in its tokenizer and room for its captions
    (48 tokens): tiny-world prompts, learned tokens included, are read whole."""
    from cns.testing import DUMMY_WORDS, make_dummy_pipeline
    from cns.world.render import vocabulary_words

    path = tmp_path_factory.mktemp("world-words") / "base"
    words = list(dict.fromkeys([*DUMMY_WORDS, *vocabulary_words()]))
    make_dummy_pipeline(path, words=words, max_length=48)
    return path
