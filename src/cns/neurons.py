"""Concept Neuron Selection, Sec. 4.2 of Liao, Chen et al., *Continual Personalization for
Diffusion Models* (ICCV 2025): Eq. 3 to 6 as pure tensor functions.

A *neuron* is one element of a cross-attention key or value weight. torch stores a linear
weight as ``(out, in)``; the paper writes ``W`` as ``(in, out)``. Everything here uses torch's
layout. Nothing here touches a model, a file or a random state.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np
import torch

__all__ = [
    "wanda_scores",
    "feature_norms",
    "and_top_ratio_per_row",
    "select_top_ratio_per_row",
    "select_quantile_per_layer",
    "select_above_threshold",
    "SELECTION_RULES",
    "and_masks",
    "or_masks",
    "concept_mask",
    "regularization_mask",
    "random_mask_like",
    "density",
]


def wanda_scores(weight: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``S(W, c) = |W| (.) (1 . ||c||_2)``.

    ``weight`` is ``(out, in)``; ``conditioning`` is the text conditioning fed to the layer,
    ``(tokens, in)`` or ``(batch, tokens, in)`` (the batch is folded into the tokens). The
    l2 norm runs over tokens for each input feature and broadcasts across output rows, so
    ``score[o, i] = |W[o, i]| * ||c[:, i]||_2``.
    """
    if conditioning.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"conditioning has {conditioning.shape[-1]} features, weight expects {weight.shape[-1]}"
        )
    feature_norm = conditioning.reshape(-1, conditioning.shape[-1]).float().norm(p=2, dim=0)
    return weight.detach().float().abs() * feature_norm.unsqueeze(0)


def feature_norms(conditionings: Iterable[torch.Tensor]) -> torch.Tensor:
    """``(prompts, in)``: each prompt's ``||c[:, i]||_2`` of Eq. 3, computed as
    :func:`wanda_scores` computes it (the batch folded into the tokens, float32)."""
    return torch.stack([c.reshape(-1, c.shape[-1]).float().norm(p=2, dim=0) for c in conditionings])


def _top_k_count(in_features: int, ratio: float) -> int:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"select ratio must lie in [0, 1], got {ratio}")
    return min(in_features, max(1, round(ratio * in_features))) if ratio > 0 else 0


# Elements of one (prompts, rows, in) block of scores: small enough to stay in a CPU cache.
_BLOCK_ELEMENTS = 1 << 18


def and_top_ratio_per_row(weight: torch.Tensor, norms: torch.Tensor, ratio: float) -> torch.Tensor:
    """``AND_p select_top_ratio_per_row(wanda_scores(weight, c_p), ratio)`` (Eq. 3 then 4 or 5)
    for all prompts at once, from their :func:`feature_norms` ``norms`` ``(prompts, in)``.

    The same mask as the per-prompt composition, element for element, at a fraction of its
    time: ``|W|`` is taken once; each cache-sized block of rows is scored for every prompt
    in one product (the same float32 products as :func:`wanda_scores`), each row's k-th
    largest score comes from a values-only partial sort (``numpy.partition`` of the scores'
    bits as int32, which order as the non-negative floats do) and the row's top k are the
    scores at or above it. A row whose k-th largest score is tied (more than
    k scores reach it) is selected by ``torch.topk`` itself, as the per-prompt rule does, so
    ties break exactly as there. On a non-CPU device it runs batched ``topk`` there.
    """
    if norms.dim() != 2 or norms.shape[-1] != weight.shape[-1]:
        raise ValueError(f"norms must be (prompts, {weight.shape[-1]}), got {tuple(norms.shape)}")
    if norms.shape[0] == 0:
        raise ValueError("AND of no masks is undefined: give at least one caption or prompt")
    rows, in_features = weight.shape
    k = _top_k_count(in_features, ratio)
    magnitude = weight.detach().float().abs()
    if k == 0:
        return torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    if magnitude.device.type != "cpu":
        norms = norms.to(magnitude.device, torch.float32)
        result = None
        for p in range(norms.shape[0]):
            mask = select_top_ratio_per_row(magnitude * norms[p].unsqueeze(0), ratio)
            result = mask if result is None else result & mask
        return result
    a = magnitude.contiguous().numpy()
    n = norms.float().contiguous().numpy()
    prompts = n.shape[0]
    out = np.empty((rows, in_features), dtype=bool)
    step = max(1, _BLOCK_ELEMENTS // (prompts * in_features))
    for r0 in range(0, rows, step):
        scores = a[r0 : r0 + step][None, :, :] * n[:, None, :]  # (prompts, rows, in), float32
        # scores are >= 0, so their bits as int32 sort as the floats do (and partition faster)
        kth = np.partition(scores.view(np.int32), in_features - k, axis=-1)[..., in_features - k : in_features - k + 1]
        kth = kth.view(np.float32)
        chosen = scores >= kth
        tied = np.nonzero(chosen.view(np.uint8).sum(axis=-1, dtype=np.int32) != k)
        if tied[0].size:  # ties at the k-th score (or NaN): let topk break them, as the per-prompt rule does
            tied_scores = torch.from_numpy(np.ascontiguousarray(scores[tied]))
            exact = torch.zeros(tied_scores.shape, dtype=torch.bool)
            exact.scatter_(-1, tied_scores.topk(k, dim=-1, sorted=False).indices, True)
            chosen[tied] = exact.numpy()
        np.logical_and.reduce(chosen, axis=0, out=out[r0 : r0 + step])
    return torch.from_numpy(out)


# --- selection rules: one signature, (scores, value) -> bool mask of the scores' shape ---


def select_top_ratio_per_row(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the top ``ratio`` of each output row (Wanda's comparison group; our default).

    ``k = round(ratio * in_features)``, at least 1 when ``ratio > 0``. Ties are broken by
    ``torch.topk``, deterministically on a given device.
    """
    k = _top_k_count(scores.shape[-1], ratio)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        top = scores.topk(k, dim=-1, sorted=False).indices
        mask.scatter_(-1, top, True)
    return mask


def select_quantile_per_layer(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the elements above the layer-wide ``1 - ratio`` quantile of the scores."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"select ratio must lie in [0, 1], got {ratio}")
    if ratio == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    flat = scores.flatten()
    k = min(flat.numel(), max(1, round(ratio * flat.numel())))
    threshold = flat.kthvalue(flat.numel() - k + 1).values
    return scores >= threshold


def select_above_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep every element whose score exceeds an absolute ``threshold``."""
    return scores > threshold


SELECTION_RULES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "top_ratio_per_row": select_top_ratio_per_row,
    "quantile_per_layer": select_quantile_per_layer,
    "threshold": select_above_threshold,
}


# --- mask algebra ---


def and_masks(masks: Iterable[torch.Tensor]) -> torch.Tensor:
    """Eq. 4 and 5: the logical AND of per-prompt masks (base or general neurons)."""
    result = None
    for mask in masks:
        result = mask.clone() if result is None else result & mask
    if result is None:
        raise ValueError("AND of no masks is undefined: give at least one caption or prompt")
    return result


def or_masks(masks: Iterable[torch.Tensor], like: torch.Tensor | None = None) -> torch.Tensor:
    """The logical OR of masks; all False (shaped ``like``) when there are none."""
    result = None
    for mask in masks:
        result = mask.clone() if result is None else result | mask
    if result is None:
        if like is None:
            raise ValueError("OR of no masks needs `like` to know the shape")
        return torch.zeros_like(like, dtype=torch.bool)
    return result


def concept_mask(base: torch.Tensor, general: torch.Tensor) -> torch.Tensor:
    """Eq. 6: ``M_concept = M_base AND NOT M_general`` (the paper's text says OR by mistake)."""
    return base & ~general


def regularization_mask(concept: torch.Tensor, earlier: Iterable[torch.Tensor]) -> torch.Tensor:
    """``M_reg = M_concept_m AND (OR_{m' < m} M_concept_m')`` (Sec. 4.3, below Eq. 7)."""
    return concept & or_masks(earlier, like=concept)


def random_mask_like(
    reference: torch.Tensor, generator: torch.Generator, per_row: bool = True
) -> torch.Tensor:
    """A random mask with as many True elements as ``reference`` (Table 2's random-neuron
    ablation). With ``per_row`` the count matches row by row, else layer-wide."""
    out = torch.zeros_like(reference, dtype=torch.bool)
    if per_row:
        rows, cols = reference.shape
        counts = reference.sum(dim=1)
        order = torch.rand(rows, cols, generator=generator).argsort(dim=1)
        keep = torch.arange(cols).unsqueeze(0) < counts.unsqueeze(1)
        out.scatter_(1, order, keep)
        return out
    flat = out.flatten()
    flat[torch.randperm(flat.numel(), generator=generator)[: int(reference.sum())]] = True
    return flat.view_as(reference)


def density(mask: torch.Tensor | Mapping[str, torch.Tensor]) -> float:
    """Fraction of True elements of one mask or of a dict of per-layer masks."""
    if isinstance(mask, Mapping):
        total = sum(m.numel() for m in mask.values())
        return sum(int(m.sum()) for m in mask.values()) / total if total else 0.0
    return int(mask.sum()) / mask.numel() if mask.numel() else 0.0
