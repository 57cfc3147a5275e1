"""Means with 95 % intervals for the evaluation's figures, and paired differences.

Every figure of a run is a mean over items (prompts, or a run's summary such as F_T) that fall
in clusters (one cluster per continual run: a seed and a set). The interval is a two-level
percentile bootstrap: draw the clusters with replacement, then within each drawn cluster its
items with replacement, and take the mean of the cluster means. A paired difference between
two methods (or a method and the base model) is the same computation on the item-by-item
differences: both saw the same prompts, seeds and training batches, so what they share cancels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Interval", "bootstrap_interval", "paired_differences"]


@dataclass(frozen=True)
class Interval:
    """A mean and its ``level`` bootstrap interval; ``n``: clusters, ``items``: values in all."""

    mean: float
    low: float
    high: float
    n: int
    items: int
    level: float = 0.95

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "items": self.items,
                "level": self.level}


def _clean(clusters: Sequence[Sequence[float]]) -> list[np.ndarray]:
    out = []
    for cluster in clusters:
        values = np.asarray([v for v in cluster if v is not None], dtype=float)
        values = values[np.isfinite(values)]
        if values.size:
            out.append(values)
    return out


def bootstrap_interval(clusters: Sequence[Sequence[float]], level: float = 0.95, resamples: int = 4000,
                       seed: int = 0) -> Interval | None:
    """The mean of the cluster means and its percentile interval (two-level bootstrap).

    ``clusters``: the items of each cluster (None and non-finite values are left out, and
    clusters left empty with them). Returns None when no value is left. Deterministic for a
    given ``seed``.
    """
    data = _clean(clusters)
    if not data:
        return None
    mean = float(np.mean([c.mean() for c in data]))
    rng = np.random.default_rng(seed)
    k = len(data)
    picks = rng.integers(0, k, size=(resamples, k))
    inner = np.empty((resamples, k))  # each drawn cluster gets its own within-cluster resample
    for index, cluster in enumerate(data):
        where = picks == index
        draws = rng.integers(0, cluster.size, size=(int(where.sum()), cluster.size))
        inner[where] = cluster[draws].mean(axis=1)
    stats = inner.mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return Interval(mean=mean, low=float(low), high=float(high), n=k, items=int(sum(c.size for c in data)),
                    level=level)


def paired_differences(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> list[list[float | None]]:
    """Item-by-item ``a - b`` within each cluster (None where either is missing); the two must
    have the same clusters and items in the same order."""
    if len(a) != len(b):
        raise ValueError(f"paired clusters differ in number: {len(a)} and {len(b)}")
    out = []
    for x, y in zip(a, b):
        if len(x) != len(y):
            raise ValueError(f"a paired cluster has {len(x)} items on one side and {len(y)} on the other")
        out.append([None if u is None or v is None else float(u) - float(v) for u, v in zip(x, y)])
    return out
