"""Neuron regularization, Eq. 7 of Liao, Chen et al. (ICCV 2025), as a pure function.

``L_reg = l1 ||(W_m - W_{m-1}) (.) M_reg||_2 + l2 ||(W_m - W_0) (.) M_reg||_2``

The norm is the l2 norm of all layers' masked differences stacked into one vector, as the
equation writes it for the whole model. The first term keeps neurons that earlier concepts
tuned where those concepts left them (no forgetting); the second keeps them near the
pretrained weights (zero-shot ability).

Eq. 7 only reaches the elements this task shares with earlier ones. The elements only this
task trains still move every token's keys and values (a K/V row acts on all tokens): an
earlier concept's, and those of every generic prompt. :func:`relative_output_drift` closes
that route, beyond the paper: the relative change of the keys and values a layer makes from a
set of anchor text states, earlier concepts' tokens (L_keep) or generic prompts (L_generic).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["neuron_regularizer", "anchor_basis", "output_energy", "relative_output_drift", "key_lock"]


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


def anchor_basis(states: torch.Tensor, center: bool = True, rtol: float = 1e-6,
                 normalize: bool = False) -> torch.Tensor:
    """A ``(r, width)`` matrix R with ``R^T R = A^T A / N`` for the ``(N, width)`` text states A,
    centred on their mean first when ``center`` (r <= min(N, width)): ``||dW R^T||_F^2`` is then
    the mean squared change ``dW a`` over the rows a of A, at a cost that does not grow with N.

    Centred, a change along the mean state, the part every anchor shares, costs nothing: what
    tells the anchors apart is held, a shift common to all of them is left free. With
    ``normalize`` each state is scaled to unit length first, so that every position counts
    alike (a text encoder's first state can be many times longer than the others)."""
    states = states.reshape(-1, states.shape[-1]).double()
    if normalize:
        states = states / states.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if center:
        states = states - states.mean(dim=0, keepdim=True)
    gram = states.T @ states / max(1, states.shape[0])
    eigenvalues, vectors = torch.linalg.eigh(gram)
    keep = eigenvalues > rtol * eigenvalues.max().clamp_min(1e-30)
    return (vectors[:, keep] * eigenvalues[keep].sqrt()).T.float()


def output_energy(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``||W R^T||_F^2``: the mean squared K/V output of a layer over the anchor states."""
    return (weight.float() @ basis.T).pow(2).sum()


def relative_output_drift(
    deltas: Sequence[torch.Tensor],
    basis: torch.Tensor,
    energies: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The mean over layers of ``||dW_l R^T||^2 / ||W_l R^T||^2`` (beyond the paper).

    ``deltas``: per layer, ``W_m - W_{m-1}`` (full weights); ``basis``: :func:`anchor_basis` of
    the anchor text states (the K/V inputs of every cross-attention layer); ``energies``:
    :func:`output_energy` of ``W_{m-1}`` per layer. The value is the squared relative change
    of the anchors' keys and values, 0 when the updates are orthogonal to every anchor state.

    - L_keep: anchors = the states at earlier concepts' tokens in their prompts, centred (how
      those tokens' keys and values differ from one another is held).
    - L_generic: anchors = every position of generic prompts (the calibration prompts),
      unit-length and not centred: what prompts naming no concept produce is held, the
      zero-shot ability of Sec. 4.3 measured where it acts, on the keys and values.
    """
    if len(deltas) != len(energies):
        raise ValueError("deltas and energies need one tensor per layer each")
    if not deltas:
        return basis.new_zeros(())
    terms = [output_energy(d, basis) / e.clamp_min(1e-12) for d, e in zip(deltas, energies)]
    return torch.stack(terms).mean()


def key_lock(
    token_states: torch.Tensor,
    class_states: torch.Tensor,
    key_weights: Sequence[torch.Tensor],
    target_weights: Sequence[torch.Tensor],
) -> torch.Tensor:
    """L_lock (beyond the paper, after Perfusion's key locking): the mean over cross-attention
    key layers of ``||S_t W_l^T - S_c W*_l^T||^2 / ||S_c W*_l^T||^2``.

    ``token_states``: ``(N, width)`` text states at the new tokens' positions in their prompts
    (they move as the token's embedding trains); ``class_states``: ``(N, width)`` the states at
    the same positions with the tokens taken out (the class word);
    ``key_weights``: per key layer its current weight; ``target_weights``: its weight on entry.
    Zero when every token occurrence produces the keys its class word produced: the concept
    is attended to where its class word would be, and only its values carry what it looks like.
    """
    if len(key_weights) != len(target_weights):
        raise ValueError("key_weights and target_weights need one tensor per layer each")
    if not key_weights or token_states.numel() == 0:
        return token_states.new_zeros(())
    terms = []
    for weight, target in zip(key_weights, target_weights):
        wanted = class_states @ target.float().T
        terms.append((token_states @ weight.float().T - wanted).pow(2).sum() / wanted.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()

