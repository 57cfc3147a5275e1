"""The fast selection path gives exactly the masks of the straightforward composition of
Eq. 3 (per prompt) and Eq. 4-6 (AND, AND NOT), on random tensors and on tensors full of ties."""

import pytest
import torch

from cns import neurons
from cns.selection import mask_for_prompts, select_concept_neurons


def reference_mask(weight, conditionings, rule, value):
    """Eq. 3 then Eq. 4 / 5, one prompt at a time, as written in the paper."""
    select = neurons.SELECTION_RULES[rule]
    return neurons.and_masks(select(neurons.wanda_scores(weight, c), value) for c in conditionings)


def random_case(seed, rows, width, prompts, tokens=5, ties=False):
    generator = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many scores tie at the k-th place
        weight = torch.randint(-2, 3, (rows, width), generator=generator).float()
        conditionings = [torch.randint(0, 2, (tokens, width), generator=generator).float() for _ in range(prompts)]
    else:
        weight = torch.randn(rows, width, generator=generator)
        conditionings = [torch.randn(tokens, width, generator=generator) * torch.rand(width, generator=generator) * 3
                         for _ in range(prompts)]
    return weight, conditionings


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.1, 0.37, 1.0])
def test_and_top_ratio_per_row_equals_per_prompt_topk(ties, ratio):
    for seed, (rows, width, prompts) in enumerate([(1, 7, 1), (13, 40, 3), (700, 96, 20), (64, 768, 23)]):
        weight, conditionings = random_case(seed, rows, width, prompts, ties=ties)
        expected = reference_mask(weight, conditionings, "top_ratio_per_row", ratio)
        got = neurons.and_top_ratio_per_row(weight, neurons.feature_norms(conditionings), ratio)
        assert got.dtype == torch.bool and got.shape == weight.shape
        assert torch.equal(got, expected), (seed, rows, width, prompts)


def test_blocks_do_not_change_the_mask(monkeypatch):
    weight, conditionings = random_case(5, 300, 64, 4)
    expected = reference_mask(weight, conditionings, "top_ratio_per_row", 0.1)
    for block in (1, 64 * 4, 64 * 4 * 7 + 3, 1 << 22):
        monkeypatch.setattr(neurons, "_BLOCK_ELEMENTS", block)
        assert torch.equal(neurons.and_top_ratio_per_row(weight, neurons.feature_norms(conditionings), 0.1), expected)


@pytest.mark.parametrize("rule,value", [("top_ratio_per_row", 0.1), ("quantile_per_layer", 0.2), ("threshold", 0.5)])
def test_mask_for_prompts_matches_reference_for_every_rule(rule, value):
    weight, conditionings = random_case(1, 50, 32, 6)
    assert torch.equal(mask_for_prompts(weight, conditionings, rule, value),
                       reference_mask(weight, conditionings, rule, value))


def test_select_concept_neurons_matches_reference_composition():
    generator = torch.Generator().manual_seed(0)
    weights = {f"l{i}.to_{kv}": torch.randn(rows, 48, generator=generator)
               for i, rows in enumerate([16, 32, 64]) for kv in "kv"}
    captions = [torch.randn(7, 48, generator=generator) for _ in range(3)]
    calibration = [torch.randn(7, 48, generator=generator) * 2 for _ in range(20)]
    result = select_concept_neurons(weights, captions, calibration, "top_ratio_per_row", 0.25)
    for name, weight in weights.items():
        base = reference_mask(weight, captions, "top_ratio_per_row", 0.25)
        general = reference_mask(weight, calibration, "top_ratio_per_row", 0.25)
        assert torch.equal(result.base[name], base)
        assert torch.equal(result.general[name], general)
        assert torch.equal(result.concept[name], base & ~general)


def test_fast_path_rejects_bad_input():
    with pytest.raises(ValueError):
        neurons.and_top_ratio_per_row(torch.ones(2, 3), torch.ones(1, 4), 0.5)
    with pytest.raises(ValueError):
        neurons.and_top_ratio_per_row(torch.ones(2, 3), torch.ones(0, 3), 0.5)
    with pytest.raises(ValueError):
        neurons.and_top_ratio_per_row(torch.ones(2, 3), torch.ones(1, 3), 1.5)
    with pytest.raises(ValueError):
        select_concept_neurons({"l": torch.ones(2, 3)}, [torch.ones(1, 4)], [torch.ones(1, 4)])


def test_non_finite_weights_select_as_topk_does():
    weight, conditionings = random_case(3, 40, 24, 4)
    weight[0, 3] = float("nan")
    weight[1, :5] = float("inf")
    weight[2, 7] = -float("inf")
    conditionings[0][:, 5] = 0.0  # inf * 0 = nan in one prompt's scores
    for ratio in (0.1, 0.5):
        expected = reference_mask(weight, conditionings, "top_ratio_per_row", ratio)
        assert torch.equal(neurons.and_top_ratio_per_row(weight, neurons.feature_norms(conditionings), ratio), expected)
