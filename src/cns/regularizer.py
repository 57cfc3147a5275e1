"""Neuron regularization, Eq. 7 of Liao, Chen et al. (ICCV 2025), as a pure function.

``L_reg = l1 ||(W_m - W_{m-1}) (.) M_reg||_2 + l2 ||(W_m - W_0) (.) M_reg||_2``

The norm is the l2 norm of all layers' masked differences stacked into one vector, as the
equation writes it for the whole model. The first term keeps neurons that earlier concepts
tuned where those concepts left them (no forgetting); the second keeps them near the
pretrained weights (zero-shot ability).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["neuron_regularizer"]


def _stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors]) if len(tensors) != 1 else tensors[0].flatten()


def neuron_regularizer(
    current: Sequence[torch.Tensor],
    previous: Sequence[torch.Tensor],
    pretrained: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    lambda_previous: float = 1.0,
    lambda_pretrained: float = 0.1,
) -> torch.Tensor:
    """Eq. 7 over a list of layers.

    Each argument is a sequence with one tensor per layer, all four of matching shapes (the
    full weights, or the same gathered subset of elements of each). ``masks`` holds M_reg,
    boolean or 0/1. Returns a scalar; its (sub)gradient is 0 where the masked differences
    are all 0, so a task with no overlap gets neither loss nor gradient from it.

    The layers are stacked first and the differences taken once over the stacked vector
    (the same values as layer by layer, in a handful of operations whatever the number of
    layers: this runs every training step).
    """
    if not (len(current) == len(previous) == len(pretrained) == len(masks)):
        raise ValueError("current, previous, pretrained and masks need one tensor per layer each")
    if not current:
        return lambda_previous * torch.linalg.vector_norm(torch.zeros(0)) + lambda_pretrained * (
            torch.linalg.vector_norm(torch.zeros(0))
        )
    weight = _stacked(current)
    mask = _stacked([m.to(weight.dtype) if m.dtype == torch.bool else m for m in masks])
    to_previous = (weight - _stacked(previous)) * mask
    to_pretrained = (weight - _stacked(pretrained)) * mask
    return lambda_previous * torch.linalg.vector_norm(to_previous) + lambda_pretrained * (
        torch.linalg.vector_norm(to_pretrained)
    )
