"""Where forgetting and drift come from: how much a task moves the keys and values of given
text states, as pure tensor functions.

A cross-attention K/V layer maps text states ``c`` to ``W c``. A task changes ``W`` by
``dW``; what it does to a prompt is ``dW c`` at every position of the prompt. The relative
change ``||dW C||_F / ||W C||_F`` over a set of states ``C`` (held-out generic prompts: the
zero-shot ability; earlier concepts' tokens in their prompts: forgetting) says how far the task
reached, layer by layer. Splitting ``dW`` by element (those earlier concepts also trained, the
*overlap* L_reg restrains, and the task's own) says which route it took.
"""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["kv_outputs", "relative_change", "drift_by_route"]


@torch.no_grad()
def kv_outputs(weights: Mapping[str, torch.Tensor], states: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{layer: states @ W^T}`` for ``(N, width)`` states: every layer's keys or values."""
    return {name: states.to(w.device, torch.float32) @ w.detach().float().T for name, w in weights.items()}


def _ratio(change: float, size: float) -> float:
    return change / size if size > 0 else 0.0


@torch.no_grad()
def relative_change(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> dict:
    """``{'total': ||after - before|| / ||before||, 'layers': {layer: the same}}`` over layers'
    outputs (:func:`kv_outputs`): the Frobenius norms of all layers together, then of each."""
    layers, change, size = {}, 0.0, 0.0
    for name, b in before.items():
        d = float((after[name].float() - b.float()).pow(2).sum())
        s = float(b.float().pow(2).sum())
        layers[name] = _ratio(d ** 0.5, s ** 0.5)
        change, size = change + d, size + s
    return {"total": _ratio(change ** 0.5, size ** 0.5), "layers": layers}


@torch.no_grad()
def drift_by_route(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    states: torch.Tensor,
    earlier: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """The relative change of the K/V outputs of ``states`` from ``before`` to ``after``
    (weights per layer), in all and split by route: through elements that ``earlier`` (a
    boolean mask per layer: what earlier concepts trained) marks (``overlap``) and through
    the others (``own``). The two parts add up to the whole change, not their norms."""
    outputs = kv_outputs(before, states)
    size = sum(float(o.pow(2).sum()) for o in outputs.values())
    report = {"states": int(states.shape[0])}
    deltas = {n: after[n].detach().float() - before[n].detach().float() for n in before}
    routes = {"total": deltas}
    if earlier is not None:
        routes["overlap"] = {n: d * earlier[n].to(d.device, d.dtype) for n, d in deltas.items() if n in earlier}
        routes["own"] = {n: d - routes["overlap"].get(n, torch.zeros_like(d)) for n, d in deltas.items()}
    for route, parts in routes.items():
        moved = kv_outputs(parts, states)
        report[route] = _ratio(sum(float(m.pow(2).sum()) for m in moved.values()) ** 0.5, size ** 0.5)
        if route == "total":
            report["layers"] = {n: _ratio(float(moved[n].pow(2).sum()) ** 0.5, float(outputs[n].pow(2).sum()) ** 0.5)
                                for n in moved}
    return report
