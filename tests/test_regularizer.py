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
