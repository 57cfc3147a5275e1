"""Refit a task's masked K/V update in closed form (beyond the paper).

A K/V row acts on every text state, so the elements a concept trains also move what generic
prompts feed the UNet. After training, each masked row's update is re-solved to keep what it
does to the concept's own text states and to hold what it does to generic prompts' states:

    delta' = argmin_d  ||(d - delta) X_S^T||^2 / N_X  +  weight * ||d G_S^T||^2 / N_G      (row by row)
           = delta A_S (A_S + weight B_S + eps I)^{-1},   A = X^T X / N_X,  B = G^T G / N_G,

with S the row's masked columns (the update stays on the mask: CNS's Eq. 4-6 choose where W
may change, this chooses how). It is the least-squares edit ROME and Mix-of-Show's gradient
fusion solve, restricted to CNS's elements; a quadratic penalty on the same quantity
(L_generic, :func:`cns.regularizer.relative_output_drift`) reaches it only as fast as Adam
on the masked elements finds the directions generic prompts use least.
"""

from __future__ import annotations

import torch

__all__ = ["refit_masked_update"]


def refit_masked_update(delta: torch.Tensor, mask: torch.Tensor, concept_states: torch.Tensor,
                        generic_states: torch.Tensor, weight: float, eps: float = 1e-6) -> torch.Tensor:
    """``delta``: ``(out, in)`` update of one K/V weight, zero off ``mask``; ``concept_states``
    ``(N_X, in)`` and ``generic_states`` ``(N_G, in)`` text states. Returns the refitted update
    (same shape and dtype, zero off ``mask``). ``eps`` is relative to the mean diagonal of
    ``A + weight B``. Rows are solved in float64, grouped by their number of masked elements."""
    x = concept_states.double()
    g = generic_states.double()
    a = x.T @ x / max(1, x.shape[0])
    b = g.T @ g / max(1, g.shape[0])
    m = a + weight * b
    ridge = eps * float(m.diagonal().mean()) if m.numel() else eps
    d = delta.double()
    out = torch.zeros_like(d)
    mask = mask.bool()
    counts = mask.sum(dim=1)
    for count in counts.unique().tolist():
        if count == 0:
            continue
        rows = (counts == count).nonzero().flatten()
        cols = torch.stack([mask[r].nonzero().flatten() for r in rows.tolist()])  # (R, count)
        a_s = a[cols.unsqueeze(2), cols.unsqueeze(1)]  # (R, count, count)
        m_s = m[cols.unsqueeze(2), cols.unsqueeze(1)] + ridge * torch.eye(count, dtype=torch.float64)
        d_s = d[rows.unsqueeze(1), cols]  # (R, count)
        rhs = (d_s.unsqueeze(1) @ a_s).squeeze(1)  # delta A_S
        # d' M_S = delta A_S  <=>  M_S^T d'^T = (delta A_S)^T, M_S symmetric
        solved = torch.linalg.solve(m_s, rhs.unsqueeze(2)).squeeze(2)
        out[rows.unsqueeze(1), cols] = solved
    return out.to(delta.dtype)
