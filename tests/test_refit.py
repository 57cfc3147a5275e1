"""The closed-form refit of a masked K/V update against hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cns.refit import refit_masked_update


def test_what_generic_prompts_use_is_taken_out_and_what_the_concept_uses_is_kept():
    # the concept reads input 0 only, generic prompts input 1 only: of the row's update on {0, 1}
    # the part on input 0 stays, the part on input 1 goes; input 2 is off the mask
    x = torch.tensor([[2.0, 0.0, 0.0]])
    g = torch.tensor([[0.0, 3.0, 0.0], [0.0, 1.0, 0.0]])
    delta = torch.tensor([[0.5, -0.4, 0.0]])
    mask = torch.tensor([[True, True, False]])
    out = refit_masked_update(delta, mask, x, g, weight=1.0, eps=0.0)
    assert torch.allclose(out, torch.tensor([[0.5, 0.0, 0.0]]))


def test_each_row_is_the_ridge_solution_on_its_own_masked_columns():
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(6, 5, generator=gen), torch.randn(9, 5, generator=gen)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    delta = torch.randn(4, 5, generator=gen) * mask
    weight = 0.7
    out = refit_masked_update(delta, mask, x, g, weight, eps=0.0)
    a = x.double().numpy().T @ x.double().numpy() / 6
    b = g.double().numpy().T @ g.double().numpy() / 9
    for r in range(4):
        s = np.flatnonzero(mask[r].numpy())
        expected = np.zeros(5)
        if len(s):  # minimise ||(d - delta) X_S^T||^2 / N_X + weight ||d G_S^T||^2 / N_G by hand
            d = delta[r].double().numpy()[s]
            expected[s] = np.linalg.solve((a[np.ix_(s, s)] + weight * b[np.ix_(s, s)]).T, (d @ a[np.ix_(s, s)]))
        assert np.allclose(out[r].double().numpy(), expected, atol=1e-6), r
    assert (out[~mask] == 0).all()


def test_without_generic_weight_an_update_the_concept_fully_sees_is_kept():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=gen)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 2] = False
    delta = torch.randn(3, 4, generator=gen) * mask
    out = refit_masked_update(delta, mask, x, torch.randn(5, 4, generator=gen), weight=0.0, eps=0.0)
    assert torch.allclose(out, delta, atol=1e-5)
    # and a growing weight moves generic outputs less
    g = torch.randn(30, 4, generator=gen)
    drift = [float((refit_masked_update(delta, mask, x, g, w) @ g.T).norm()) for w in (0.0, 0.3, 3.0, 30.0)]
    assert drift == sorted(drift, reverse=True) and drift[-1] < 0.5 * drift[0]


def test_the_dtype_and_shape_are_kept():
    delta = torch.zeros(2, 3, dtype=torch.float16)
    out = refit_masked_update(delta, torch.ones(2, 3, dtype=torch.bool), torch.randn(4, 3), torch.randn(4, 3), 1.0)
    assert out.dtype == torch.float16 and out.shape == (2, 3)
    with pytest.raises(RuntimeError):
        refit_masked_update(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.randn(4, 5),
                            torch.randn(4, 3), 1.0)
