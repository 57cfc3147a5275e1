"""The bootstrap intervals against cases computed by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cns.evaluation.intervals import bootstrap_interval, paired_differences


def test_one_cluster_of_two_values_gives_the_exact_bootstrap_quantiles():
    # resampling (0, 1) gives means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4: the 2.5 % and
    # 97.5 % quantiles are 0 and 1
    interval = bootstrap_interval([[0.0, 1.0]])
    assert interval.mean == 0.5
    assert (interval.low, interval.high) == (0.0, 1.0)
    assert (interval.n, interval.items) == (1, 2)


def test_clusters_of_equal_items_vary_only_by_which_clusters_are_drawn():
    # clusters (a, a, a) and (b, b, b): the resampled mean is a, (a+b)/2 or b (1/4, 1/2, 1/4)
    interval = bootstrap_interval([[0.2] * 3, [0.6] * 3])
    assert interval.mean == pytest.approx(0.4)
    assert interval.low == pytest.approx(0.2)
    assert interval.high == pytest.approx(0.6)


def test_the_mean_weights_every_cluster_alike_and_the_interval_matches_full_enumeration():
    clusters = [[0.1, 0.3, 0.8], [0.5]]
    interval = bootstrap_interval(clusters, resamples=200_000, seed=3)
    assert interval.mean == pytest.approx((0.4 + 0.5) / 2)  # not the mean of the four items (0.425)
    # every outcome of the two-level bootstrap, by enumeration: 2 cluster draws x 27 inner draws
    outcomes, weights = [], []
    inner = [np.mean(draw) for draw in itertools.product(clusters[0], repeat=3)]
    for picks in itertools.product(range(2), repeat=2):
        for draws in itertools.product(*[inner if p == 0 else [0.5] for p in picks]):
            outcomes.append(np.mean(draws))
            weights.append(1.0 / (4 * 27 ** sum(p == 0 for p in picks)))
    order = np.argsort(outcomes)
    cdf = np.cumsum(np.asarray(weights)[order])
    exact_low = np.asarray(outcomes)[order][np.searchsorted(cdf, 0.025)]
    exact_high = np.asarray(outcomes)[order][np.searchsorted(cdf, 0.975)]
    assert interval.low == pytest.approx(exact_low, abs=0.02)
    assert interval.high == pytest.approx(exact_high, abs=0.02)


def test_paired_differences_cancel_what_two_methods_share():
    shared = [[0.1, 0.9, 0.4], [0.7, 0.2]]  # prompt difficulty: large spread
    better = [[x + 0.05 for x in c] for c in shared]
    diff = bootstrap_interval(paired_differences(better, shared))
    assert diff.mean == pytest.approx(0.05)
    assert diff.low == pytest.approx(0.05) and diff.high == pytest.approx(0.05)
    assert diff.excludes_zero()
    unpaired = bootstrap_interval(better)
    assert unpaired.high - unpaired.low > 0.1  # alone, each is far less certain


def test_missing_and_non_finite_items_are_left_out():
    interval = bootstrap_interval([[1.0, None, float("nan")], [None]])
    assert (interval.mean, interval.low, interval.high, interval.n, interval.items) == (1.0, 1.0, 1.0, 1, 1)
    assert bootstrap_interval([[None]]) is None
    assert paired_differences([[1.0, None]], [[0.5, 2.0]]) == [[0.5, None]]
    with pytest.raises(ValueError):
        paired_differences([[1.0]], [[1.0, 2.0]])
