"""Eq. 7: zero without overlap, the right value and gradient with it."""

import torch

from cns.regularizer import neuron_regularizer


def test_zero_loss_and_zero_gradient_without_overlap():
    current = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    previous = torch.tensor([0.0, 0.0, 0.0])
    pretrained = torch.tensor([5.0, 5.0, 5.0])
    no_overlap = torch.zeros(3, dtype=torch.bool)
    loss = neuron_regularizer([current], [previous], [pretrained], [no_overlap])
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(current.grad, torch.zeros(3))


def test_zero_gradient_at_the_previous_weights_is_finite():
    # at the start of a task W_m == W_{m-1} on M_reg: the norm's subgradient must be 0, not NaN
    current = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = neuron_regularizer([current], [current.detach().clone()], [current.detach().clone()],
                              [torch.ones(2, dtype=torch.bool)])
    loss.backward()
    assert torch.equal(current.grad, torch.zeros(2))


def test_value_and_gradient_with_overlap():
    current = torch.tensor([3.0, 10.0, 1.0], requires_grad=True)
    previous = torch.tensor([0.0, 0.0, 1.0])
    pretrained = torch.tensor([3.0, 0.0, 5.0])
    mask = torch.tensor([True, False, True])
    # masked differences: to previous (3, 0, 0) -> norm 3; to pretrained (0, 0, -4) -> norm 4
    loss = neuron_regularizer([current], [previous], [pretrained], [mask], lambda_previous=2.0, lambda_pretrained=0.5)
    assert loss.item() == 2.0 * 3.0 + 0.5 * 4.0
    loss.backward()
    # d/dw l1 ||d1|| = l1 d1 / ||d1||, likewise for the second term; element 1 is outside M_reg
    assert torch.allclose(current.grad, torch.tensor([2.0 * 1.0, 0.0, 0.5 * -1.0]))


def test_norm_stacks_all_layers():
    a = torch.tensor([3.0], requires_grad=True)
    b = torch.tensor([4.0], requires_grad=True)
    zeros = [torch.zeros(1), torch.zeros(1)]
    ones = [torch.ones(1, dtype=torch.bool)] * 2
    loss = neuron_regularizer([a, b], zeros, zeros, ones, lambda_previous=1.0, lambda_pretrained=0.0)
    assert loss.item() == 5.0  # ||(3, 4)||, not 3 + 4


# --- L_keep (beyond the paper): K/V output drift on earlier concepts' token states ---

from cns.regularizer import anchor_basis, relative_output_drift, output_energy  # noqa: E402


def test_anchor_basis_gives_the_mean_squared_output_change_over_the_anchors():
    g = torch.Generator().manual_seed(0)
    for n in (3, 40):  # fewer and more anchors than the width
        anchors = torch.randn(n, 8, generator=g)
        delta = torch.randn(5, 8, generator=g)
        basis = anchor_basis(anchors, center=False)
        assert basis.shape[0] == min(n, 8)
        expected = (delta @ anchors.T).pow(2).sum() / n
        assert torch.allclose(output_energy(delta, basis), expected, rtol=1e-4)
        centered = anchors - anchors.mean(dim=0)
        expected = (delta @ centered.T).pow(2).sum() / n
        assert torch.allclose(output_energy(delta, anchor_basis(anchors)), expected, rtol=1e-4)


def test_centred_anchors_leave_a_shift_common_to_all_of_them_free():
    anchors = torch.tensor([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0]])  # mean (1, 0, 0), difference along axis 2
    weight = torch.eye(3)
    along_mean = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    along_difference = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    centred, raw = anchor_basis(anchors), anchor_basis(anchors, center=False)
    assert relative_output_drift([along_mean], centred, [output_energy(weight, centred)]).item() == 0.0
    assert relative_output_drift([along_mean], raw, [output_energy(weight, raw)]).item() > 0.0
    assert relative_output_drift([along_difference], centred, [output_energy(weight, centred)]).item() > 0.0


def test_drift_is_zero_for_updates_orthogonal_to_every_anchor_and_relative_otherwise():
    anchors = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])  # span: the first axis
    weight = torch.tensor([[1.0, 5.0, 0.0], [3.0, 0.0, 7.0]])
    basis = anchor_basis(anchors, center=False)
    energy = output_energy(weight, basis)
    orthogonal = torch.tensor([[0.0, 9.0, -4.0], [0.0, 1.0, 2.0]])
    assert relative_output_drift([orthogonal], basis, [energy]).item() == 0.0
    # doubling the weight doubles every anchor's output: relative squared change 1
    assert torch.isclose(relative_output_drift([weight], basis, [energy]), torch.tensor(1.0))
    # the mean over layers
    drift = relative_output_drift([weight, orthogonal], basis, [energy, energy])
    assert torch.isclose(drift, torch.tensor(0.5))


def test_descending_the_drift_only_moves_the_update_inside_the_anchor_span():
    anchors = torch.tensor([[1.0, 1.0, 0.0]])
    basis = anchor_basis(anchors, center=False)
    delta = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    relative_output_drift([delta], basis, [torch.tensor(1.0)]).backward()
    grad = delta.grad[0]
    assert grad[2] == 0.0  # the third input never reaches an anchor's output
    assert torch.isclose(grad[0], grad[1])  # along the anchor direction (1, 1, 0)
    assert grad[0] > 0


def test_normalized_anchors_count_every_position_alike():
    """L_generic's basis: each state scaled to unit length, not centred; by hand for two
    anchors, one ten times longer than the other."""
    anchors = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    delta = torch.tensor([[1.0, 2.0]])
    basis = anchor_basis(anchors, center=False, normalize=True)
    # unit anchors (1, 0) and (0, 1): mean of (1*1)^2 and (2*1)^2 = 2.5
    assert torch.isclose(output_energy(delta, basis), torch.tensor(2.5))
    weight = torch.tensor([[1.0, 1.0]])  # energy: mean of 1 and 1 = 1
    assert torch.isclose(relative_output_drift([delta], basis, [output_energy(weight, basis)]), torch.tensor(2.5))
    # unnormalised, the long anchor dominates: (100 * 1 + 1 * 4) / 2 = 52
    assert torch.isclose(output_energy(delta, anchor_basis(anchors, center=False)), torch.tensor(52.0))


# --- L_lock (beyond the paper): a new token's keys held at its class word's ---

from cns.regularizer import key_lock  # noqa: E402


def test_key_lock_by_hand():
    token = torch.tensor([[1.0, 0.0]])
    cls = torch.tensor([[0.0, 1.0]])
    w = torch.tensor([[1.0, 2.0]])  # target key of the class word: 2; the token's key: 1
    assert torch.isclose(key_lock(token, cls, [w], [w]), torch.tensor((1 - 2) ** 2 / 2 ** 2))
    # two layers: the mean; a layer where the token already has the class word's key adds 0
    same = torch.tensor([[3.0, 3.0]])
    assert torch.isclose(key_lock(token, cls, [w, same], [w, same]), torch.tensor(0.25 / 2))
    # the gradient reaches both the weight and the token's state
    state = token.clone().requires_grad_(True)
    weight = w.clone().requires_grad_(True)
    key_lock(state, cls, [weight], [w]).backward()
    assert state.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0
    assert key_lock(torch.zeros(0, 2), torch.zeros(0, 2), [w], [w]).item() == 0.0
