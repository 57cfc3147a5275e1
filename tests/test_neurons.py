"""Eq. 3-6 on hand-made tensors, checkable by hand."""

import pytest
import torch

from cns import neurons
from cns.selection import select_concept_neurons


def test_wanda_score_is_abs_weight_times_feature_norm():
    weight = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    # two tokens: feature norms are ||(3, 4)|| = 5, ||(0, 0)|| = 0, ||(1, 0)|| = 1
    conditioning = torch.tensor([[3.0, 0.0, 1.0], [4.0, 0.0, 0.0]])
    expected = torch.tensor([[5.0, 0.0, 3.0], [20.0, 0.0, 6.0]])
    assert torch.equal(neurons.wanda_scores(weight, conditioning), expected)
    # a batch folds into the tokens
    assert torch.equal(neurons.wanda_scores(weight, conditioning.unsqueeze(0)), expected)


def test_wanda_score_rejects_wrong_width():
    with pytest.raises(ValueError):
        neurons.wanda_scores(torch.ones(2, 3), torch.ones(4, 2))


def test_top_ratio_per_row_compares_within_rows():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2], [10.0, 1.0, 3.0, 2.0]])
    mask = neurons.select_top_ratio_per_row(scores, 0.5)  # k = 2 per row
    assert mask.tolist() == [[False, True, True, False], [True, False, True, False]]
    # at least one element per row for any ratio > 0, none for 0
    assert neurons.select_top_ratio_per_row(scores, 0.01).sum(dim=1).tolist() == [1, 1]
    assert not neurons.select_top_ratio_per_row(scores, 0.0).any()


def test_quantile_and_threshold_rules_are_layer_wide():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2], [10.0, 1.0, 3.0, 2.0]])
    assert neurons.select_quantile_per_layer(scores, 0.25).tolist() == [
        [False, False, False, False],
        [True, False, True, False],
    ]
    assert neurons.select_above_threshold(scores, 2.5).tolist() == [
        [False, False, False, False],
        [True, False, True, False],
    ]


def test_base_general_concept_masks_by_hand():
    m1 = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    m2 = torch.tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    base = neurons.and_masks([m1, m2])  # Eq. 4
    assert base.tolist() == [[True, False, False], [False, True, True]]
    general = neurons.and_masks([torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)])  # Eq. 5
    concept = neurons.concept_mask(base, general)  # Eq. 6: AND NOT
    assert concept.tolist() == [[False, False, False], [False, False, True]]


def test_regularization_mask_is_overlap_with_earlier_concepts():
    concept = torch.tensor([1, 1, 0, 1], dtype=torch.bool)
    earlier = [torch.tensor([1, 0, 0, 0], dtype=torch.bool), torch.tensor([0, 0, 1, 1], dtype=torch.bool)]
    assert neurons.regularization_mask(concept, earlier).tolist() == [True, False, False, True]
    assert not neurons.regularization_mask(concept, []).any()


def test_and_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        neurons.and_masks([])


def test_random_mask_keeps_count_per_row_and_is_seeded():
    reference = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    a = neurons.random_mask_like(reference, torch.Generator().manual_seed(3))
    b = neurons.random_mask_like(reference, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.sum(dim=1).tolist() == [2, 1, 0]
    layer_wide = neurons.random_mask_like(reference, torch.Generator().manual_seed(3), per_row=False)
    assert int(layer_wide.sum()) == 3


def test_select_concept_neurons_removes_general_neurons_and_reports():
    # Layer with 1 output row and 4 inputs; equal weights, so features with the largest
    # norm win. Captions light features 0 and 1; calibration prompts light 0 and 2.
    weights = {"layer": torch.ones(1, 4)}
    captions = [torch.tensor([[5.0, 4.0, 0.0, 0.0]]), torch.tensor([[4.0, 5.0, 0.0, 1.0]])]
    calibration = [torch.tensor([[5.0, 0.0, 4.0, 0.0]]), torch.tensor([[4.0, 1.0, 5.0, 0.0]])]
    result = select_concept_neurons(weights, captions, calibration, "top_ratio_per_row", 0.5)
    assert result.base["layer"].tolist() == [[True, True, False, False]]
    assert result.general["layer"].tolist() == [[True, False, True, False]]
    assert result.concept["layer"].tolist() == [[False, True, False, False]]
    report = result.report
    assert report["counts"] == {"base": 2, "general": 2, "concept": 1, "overlap_with_earlier": 0}
    assert report["density"]["concept"] == 0.25
    assert report["general_share_of_base"] == 0.5
    again = select_concept_neurons(weights, captions, calibration, "top_ratio_per_row", 0.5, [result.concept])
    assert again.report["counts"]["overlap_with_earlier"] == 1
    assert again.report["overlap_share_of_concept"] == 1.0
