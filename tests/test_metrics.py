"""CLIP-I / CLIP-T, prompt preparation, zero-shot helper and continual summaries on hand-made
values, and ClipScorer on a tiny randomly initialised CLIPModel saved to a temporary folder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cns.evaluation import (
    ClipScorer,
    ClipSettings,
    attribute_accuracy,
    average_score,
    backward_transfer,
    clip_i,
    clip_t,
    continual_summary,
    forgetting,
    multi_concept_clip_i,
    prepare_prompt,
)

GEN = [[1.0, 0.0], [0.0, 1.0]]
REF = [[1.0, 0.0], [0.6, 0.8]]


# ---------------------------------------------------------------------------
# CLIP-I / CLIP-T
# ---------------------------------------------------------------------------


def test_clip_i_is_mean_over_all_pairs():
    # cosines: (1, 0.6, 0, 0.8) -> 0.6
    assert clip_i(GEN, REF) == pytest.approx(0.6)
    assert clip_i(GEN, REF, ClipSettings(scale=2.5)) == pytest.approx(1.5)
    # raw (unnormalised) features give the same cosines
    assert clip_i([[3.0, 0.0], [0.0, 0.5]], [[2.0, 0.0], [3.0, 4.0]]) == pytest.approx(0.6)
    assert clip_i(torch.tensor(GEN), torch.tensor(REF)) == pytest.approx(0.6)


def test_clip_i_clipping_at_zero_per_pair():
    gen = [[1.0, 0.0], [0.0, 1.0]]
    ref = [[-1.0, 0.0]]  # cosines -1 and 0
    assert clip_i(gen, ref) == pytest.approx(-0.5)
    assert clip_i(gen, ref, ClipSettings(clip_at_zero=True)) == pytest.approx(0.0)
    mixed = [[0.6, 0.8], [-0.6, 0.8]]  # against [1, 0]: 0.6 and -0.6
    assert clip_i(mixed, [[1.0, 0.0]], ClipSettings(clip_at_zero=True)) == pytest.approx(0.3)
    assert clip_i(mixed, [[1.0, 0.0]], ClipSettings(scale=2.5, clip_at_zero=True)) == pytest.approx(0.75)


def test_clip_i_excluding_self_pairs():
    own = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]  # off-diagonal cosines 0.6, 0, 0.8 (each twice)
    assert clip_i(own, own, exclude_diagonal=True) == pytest.approx((0.6 + 0.0 + 0.8) / 3)
    assert clip_i(own, own) == pytest.approx((3 + 2 * (0.6 + 0.8)) / 9)
    with pytest.raises(ValueError):
        clip_i(own, own[:2], exclude_diagonal=True)


def test_multi_concept_clip_i_is_mean_over_concepts():
    gen = [[1.0, 0.0], [0.6, 0.8]]
    ref_a = [[1.0, 0.0]]  # CLIP-I (1 + 0.6) / 2 = 0.8
    ref_b = [[0.0, 1.0]]  # CLIP-I (0 + 0.8) / 2 = 0.4
    assert multi_concept_clip_i(gen, [ref_a, ref_b]) == pytest.approx(0.6)
    assert multi_concept_clip_i(gen, [ref_a, ref_b], ClipSettings(scale=2.5)) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        multi_concept_clip_i(gen, [])


def test_clip_t_one_prompt_or_one_per_image():
    images = [[1.0, 0.0], [0.6, 0.8]]
    assert clip_t(images, [[0.0, 1.0]]) == pytest.approx(0.4)  # (0 + 0.8) / 2
    assert clip_t(images, [0.0, 1.0]) == pytest.approx(0.4)  # a single 1-D text embedding
    assert clip_t(images, [[0.0, 1.0]], ClipSettings(scale=2.5)) == pytest.approx(1.0)
    # one prompt per image: pairs (image k, text k) only -> (1 + 0.8) / 2
    assert clip_t(images, [[1.0, 0.0], [0.0, 1.0]]) == pytest.approx(0.9)
    assert clip_t([[1.0, 0.0]], [[-1.0, 0.0]], ClipSettings(clip_at_zero=True)) == 0.0
    with pytest.raises(ValueError):
        clip_t(images, [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def test_mismatched_embedding_sizes_raise():
    with pytest.raises(ValueError):
        clip_i([[1.0, 0.0]], [[1.0, 0.0, 0.0]])


# ---------------------------------------------------------------------------
# Prompts and settings
# ---------------------------------------------------------------------------


def test_prepare_prompt_replaces_tokens_with_class_words():
    mapping = {"<new1>": "dog", "<new2>": "hat"}
    s = ClipSettings(replace_tokens_with_class=True)
    assert prepare_prompt("a <new1> dog with a <new2> hat", mapping, s) == "a dog with a hat"
    assert prepare_prompt("a photo of <new1>", mapping, s) == "a photo of dog"  # no class word after it
    assert prepare_prompt("a big <new1> star, <new2> style", {"<new1>": "star", "<new2>": "style"}, s) == \
        "a big star, style"
    assert prepare_prompt("a <new9> cat", mapping, s) == "a cat"  # unknown token dropped
    assert prepare_prompt("a <new1> dog", mapping, ClipSettings(replace_tokens_with_class=False)) == "a <new1> dog"


def test_prepare_prompt_prefix():
    s = ClipSettings(replace_tokens_with_class=True, text_prefix="A photo depicts ")
    assert prepare_prompt("a <new1> dog", {"<new1>": "dog"}, s) == "A photo depicts a dog"
    s2 = ClipSettings(replace_tokens_with_class=False, text_prefix="A photo depicts ")
    assert prepare_prompt("a <new1> dog", {"<new1>": "dog"}, s2) == "A photo depicts a <new1> dog"


def test_settings_describe_names_every_convention():
    text = ClipSettings(scale=2.5, clip_at_zero=True, replace_tokens_with_class=False,
                        text_prefix="A photo depicts ").describe()
    assert "\n" not in text
    assert "x2.5" in text and "clip at 0: yes" in text and "class word: no" in text and "A photo depicts" in text
    assert "x1" in ClipSettings().describe() and "clip at 0: no" in ClipSettings().describe()


# ---------------------------------------------------------------------------
# Zero-shot attribute classification
# ---------------------------------------------------------------------------


def test_attribute_accuracy_with_embeddings():
    images = [[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]]
    prompts = [[1.0, 0.0], [0.0, 1.0]]  # "red", "blue"
    assert attribute_accuracy(images, ["red", "blue"], prompts) == ["red", "blue", "red"]
    predicted, accuracy = attribute_accuracy(images, ["red", "blue"], prompts, true_labels=["red", "blue", "blue"])
    assert predicted == ["red", "blue", "red"]
    assert accuracy == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        attribute_accuracy(images, ["red", "blue"], ["a red object", "a blue object"])  # texts need a scorer


# ---------------------------------------------------------------------------
# Continual-learning summaries: a[j, i] = concept i after task j
# ---------------------------------------------------------------------------

NAN = float("nan")
SCORES = [
    [0.8, NAN, NAN],
    [0.9, 0.9, NAN],
    [0.6, 0.85, 0.75],
]


def test_average_score_is_last_row_mean():
    assert average_score(SCORES) == pytest.approx((0.6 + 0.85 + 0.75) / 3)


def test_forgetting_uses_best_earlier_score():
    # concept 0: max(0.8 - 0.6, 0.9 - 0.6) = 0.3; concept 1: 0.9 - 0.85 = 0.05; the last is excluded
    assert forgetting(SCORES) == pytest.approx((0.3 + 0.05) / 2)


def test_backward_transfer_uses_score_right_after_learning():
    # concept 0: 0.6 - 0.8 = -0.2; concept 1: 0.85 - 0.9 = -0.05
    assert backward_transfer(SCORES) == pytest.approx((-0.2 - 0.05) / 2)
    summary = continual_summary(SCORES)
    assert summary == pytest.approx({"average": 2.2 / 3, "forgetting": 0.175, "bwt": -0.125})


def test_continual_metrics_edge_cases():
    assert average_score([[0.7]]) == pytest.approx(0.7)
    assert forgetting([[0.7]]) == 0.0 and backward_transfer([[0.7]]) == 0.0
    improving = [[0.5, NAN], [0.6, 0.7]]
    assert forgetting(improving) == pytest.approx(-0.1)  # only l = 0: 0.5 - 0.6
    assert backward_transfer(improving) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        average_score([[0.5, NAN], [NAN, 0.7]])  # missing a score on/below the diagonal
    with pytest.raises(ValueError):
        forgetting([[0.5, 0.6, 0.7]])


# ---------------------------------------------------------------------------
# ClipScorer on tiny random dual encoders: a CLIPModel and an EfficientNet VisionTextDualEncoderModel
# ---------------------------------------------------------------------------

WORDS = ["a", "photo", "of", "red", "star", "dog", ","]


@pytest.fixture(scope="module", params=["vit", "efficientnet"])
def tiny_clip(request, tmp_path_factory):
    from cns.testing import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny", WORDS, image_tower=request.param)


def test_clip_scorer_loads_each_tower_as_its_own_class(tmp_path):
    from transformers import CLIPModel, VisionTextDualEncoderModel

    from cns.testing import save_tiny_clip

    vit = ClipScorer.from_pretrained(save_tiny_clip(tmp_path / "vit", WORDS), device="cpu")
    conv = ClipScorer.from_pretrained(save_tiny_clip(tmp_path / "conv", WORDS, image_tower="efficientnet"), device="cpu")
    assert type(vit.model) is CLIPModel and type(conv.model) is VisionTextDualEncoderModel
    assert conv.model.vision_model.config.model_type == "efficientnet"
    # the scorer's embeddings are the model's own projected features, normalised
    images = _images()
    pixels = conv.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        direct = conv.model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.allclose(conv.image_embeddings(images), torch.nn.functional.normalize(direct, dim=-1), atol=1e-5)


def test_clip_scorer_refuses_a_model_without_both_towers(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    from cns.testing import save_tiny_clip

    path = save_tiny_clip(tmp_path / "clip", WORDS)
    CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16)).save_pretrained(path)
    with pytest.raises(TypeError, match="not a dual image-text encoder"):
        ClipScorer.from_pretrained(path, device="cpu")


def _images():
    rng = np.random.default_rng(0)
    sizes = [(16, 16), (40, 24), (24, 48)]  # the processor resizes and crops each to 16 x 16
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_clip_scorer_embeddings_are_normalised(tiny_clip):
    scorer = ClipScorer.from_pretrained(tiny_clip, device="cpu")
    img = scorer.image_embeddings(_images())
    txt = scorer.text_embeddings(["a photo of a red star", "a dog", "a star, a dog"])
    assert img.shape == (3, 8) and txt.shape == (3, 8)
    assert img.dtype == torch.float32
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert scorer.text_embeddings("a dog").shape == (1, 8)
    assert scorer.image_embeddings([]).shape == (0, 8)
    # different inputs give different embeddings (the model is not constant)
    assert not torch.allclose(img[0], img[1])
    assert not torch.allclose(txt[0], txt[1])


def test_clip_scorer_is_deterministic_and_batch_independent(tiny_clip):
    a = ClipScorer.from_pretrained(tiny_clip, device="cpu", batch_size=64)
    b = ClipScorer.from_pretrained(tiny_clip, device="cpu", batch_size=2)
    images, texts = _images(), ["a photo of a red star", "a dog", "a red dog"]
    assert torch.equal(a.image_embeddings(images), a.image_embeddings(images))
    assert torch.allclose(a.image_embeddings(images), b.image_embeddings(images), atol=1e-5)
    assert torch.allclose(a.text_embeddings(texts), b.text_embeddings(texts), atol=1e-5)
    # scores from the scorer's embeddings are proper cosines
    value = clip_i(a.image_embeddings(images[:2]), a.image_embeddings(images[2:]))
    assert -1.0 <= value <= 1.0 and math.isfinite(value)
