"""The shipped tiny-world CLIP evaluator (src/cns/world/weights/evaluator): it loads offline as a
plain transformers dual encoder (AutoModel) + CLIPProcessor, is small, classifies shape and color of fresh
renders zero-shot, and tells a personal concept's images from plain members of its class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cns.evaluation import ClipScorer, clip_i
from cns.world.concepts import get_concept, make_concept_images
from cns.world.evaluator import (
    EVALUATOR_PATH,
    IMAGE_SIZE,
    PROMPT_WORDS,
    attribute_report,
    class_scenes,
    concept_scores,
    eval_scenes,
    sample_description,
    sample_training_scene,
)
from cns.world.render import is_legible, render, sample_scene, vocabulary_words

pytestmark = pytest.mark.skipif(
    not (EVALUATOR_PATH / "model.safetensors").exists(),
    reason=f"evaluator weights not built ({EVALUATOR_PATH}); run `python -m cns.world.evaluator train`",
)


@pytest.fixture(scope="module")
def scorer():
    torch.set_num_threads(1)
    return ClipScorer.from_pretrained(str(EVALUATOR_PATH), device="cpu")


def test_weights_are_small_and_load_as_plain_transformers():
    from transformers import AutoModel, CLIPProcessor

    size = sum(f.stat().st_size for f in EVALUATOR_PATH.iterdir() if f.is_file())
    assert size <= 10 * 1024 * 1024
    model = AutoModel.from_pretrained(str(EVALUATOR_PATH)).float()
    assert hasattr(model, "get_image_features") and hasattr(model, "get_text_features")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    processor = CLIPProcessor.from_pretrained(str(EVALUATOR_PATH))
    image = render(eval_scenes(1, "train", seed=7)[0], 32)  # the processor resizes to the model's size
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    # every caption / prompt word is one token; punctuation and personal tokens are not unknown
    tokenizer = processor.tokenizer
    for word in vocabulary_words() + list(PROMPT_WORDS):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("a photo of a star, on a striped background, <new1> style", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids and tokenizer.eos_token_id not in ids


def test_zero_shot_attributes_on_fresh_renders(scorer):
    scenes = eval_scenes(40, "train", seed=2024)
    accuracy = attribute_report(scorer, scenes)
    assert accuracy["shape"] >= 0.95 and accuracy["background"] >= 0.95, accuracy
    assert accuracy["color"] >= 0.95 and accuracy["style"] >= 0.875, accuracy


def test_zero_shot_on_held_out_combinations(scorer):
    scenes = eval_scenes(20, "heldout", seed=2024)
    accuracy = attribute_report(scorer, scenes)
    assert accuracy["shape"] >= 0.9 and accuracy["color"] >= 0.95 and accuracy["style"] >= 0.85, accuracy


def test_zero_shot_reads_colors_the_render_shows(scorer):
    scenes = eval_scenes(40, "train", seed=2024)
    everything = attribute_report(scorer, scenes)
    # renders the world no longer draws (is_legible): a color covering under half its object is misread
    rng = np.random.default_rng(5)
    hidden = []
    while len(hidden) < 20:
        scene = sample_scene(rng, "train", n_objects=1, legible=False)
        if not is_legible(scene) and scene.style != "pixelated":
            hidden.append(scene)
    assert attribute_report(scorer, hidden)["color"] <= everything["color"] - 0.2


def test_concept_images_are_closer_to_each_other_than_to_their_class(scorer):
    self_i, class_i = concept_scores(scorer, get_concept("clown-fish"), n_images=5, n_class=10, seed=0)
    assert self_i > class_i + 0.05, (self_i, class_i)


def test_plain_clip_i_protocol_matches_concept_scores(scorer):
    # with every class image laid out as a different example than the concept image it is
    # compared with, the masked average equals plain CLIP-I over those pairs
    concept = get_concept("starry-night")
    own = scorer.image_embeddings([im for im, _ in make_concept_images(concept, 3, IMAGE_SIZE, seed=0)])
    plain_scenes = class_scenes(concept, 3, seed=0, layouts=3)
    plain = scorer.image_embeddings([render(s, IMAGE_SIZE) for s in plain_scenes])
    self_i, class_i = concept_scores(scorer, concept, n_images=3, n_class=3, seed=0)
    assert self_i == pytest.approx(clip_i(own, own, exclude_diagonal=True), abs=1e-5)
    cos = own @ plain.T
    assert class_i == pytest.approx(float((cos.sum() - cos.diagonal().sum()) / 6), abs=1e-5)
    assert self_i > class_i


def test_true_descriptions_score_higher_than_false_ones(scorer):
    rng = np.random.default_rng(5)
    scenes = [sample_training_scene(rng) for _ in range(8)]
    texts = [sample_description(rng, s).text for s in scenes]
    sims = (scorer.image_embeddings([render(s, IMAGE_SIZE) for s in scenes]) @ scorer.text_embeddings(texts).T)
    # each image is on average closer to its own description than to the others
    own = sims.diagonal().mean()
    others = (sims.sum() - sims.diagonal().sum()) / (sims.numel() - len(scenes))
    assert own > others


def test_at_resolution_shows_renders_as_the_generator_draws_them():
    from cns.world.evaluator import at_resolution

    flat = np.full((2, 64, 64, 3), (200, 40, 90), dtype=np.uint8)
    assert np.abs(at_resolution(flat, 32).astype(int) - flat).max() <= 1  # plain colour survives
    fine = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    fine[0, ::2] = 255  # 1 px stripes: finer than 32 px can hold
    low = at_resolution(fine, 32)
    assert low.shape == fine.shape and low.dtype == np.uint8
    assert low.astype(float).std() < 0.2 * fine.astype(float).std()
    coarse = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    coarse[0, :, :32] = 255  # a half-image edge stays
    assert np.abs(at_resolution(coarse, 32).astype(int) - coarse).mean() < 8
    assert at_resolution(fine, 64) is fine and at_resolution(fine[:0], 32).shape == (0, 64, 64, 3)
