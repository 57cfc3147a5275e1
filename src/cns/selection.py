"""Concept neuron selection over every CNS layer (Sec. 4.2, Eq. 3-6), with its report.

Pure tensors in, masks and a report out: the caller supplies each layer's weight and the
text conditioning of the concept's captions and of the calibration prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from . import neurons

__all__ = ["SelectionResult", "select_concept_neurons", "mask_for_prompts"]


@dataclass
class SelectionResult:
    """Per-layer base, general and concept masks (Eq. 4, 5, 6) and the report."""

    base: dict[str, torch.Tensor]
    general: dict[str, torch.Tensor]
    concept: dict[str, torch.Tensor]
    report: dict = field(default_factory=dict)


def mask_for_prompts(
    weight: torch.Tensor,
    conditionings: Sequence[torch.Tensor],
    rule: str,
    value: float,
    norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """AND over prompts of each prompt's selection mask (Eq. 3 then Eq. 4 or 5).

    ``norms``: the prompts' :func:`neurons.feature_norms`, when the caller has them already
    (they are the same for every layer of one width). The default rule runs all prompts at
    once (:func:`neurons.and_top_ratio_per_row`); the others score one prompt at a time.
    """
    if norms is None:
        if not conditionings:
            raise ValueError("AND of no masks is undefined: give at least one caption or prompt")
        norms = neurons.feature_norms(conditionings)
    if rule == "top_ratio_per_row":
        return neurons.and_top_ratio_per_row(weight, norms, value)
    select = neurons.SELECTION_RULES[rule]
    magnitude = weight.detach().float().abs()
    norms = norms.to(magnitude.device, torch.float32)
    return neurons.and_masks(select(magnitude * norms[p].unsqueeze(0), value) for p in range(norms.shape[0]))


def select_concept_neurons(
    weights: Mapping[str, torch.Tensor],
    caption_conditioning: Sequence[torch.Tensor],
    calibration_conditioning: Sequence[torch.Tensor],
    rule: str = "top_ratio_per_row",
    value: float = 0.1,
    earlier_masks: Sequence[Mapping[str, torch.Tensor]] = (),
) -> SelectionResult:
    """Select one concept's neurons in every layer.

    ``weights``: ``{layer: (out, in) weight}``, the model as it stands before this concept.
    ``caption_conditioning``: one ``(tokens, in)`` tensor per caption of the concept's images.
    ``calibration_conditioning``: the same for the K general-purpose calibration prompts.
    ``earlier_masks``: concept masks of concepts learned before, for the overlap report.
    """
    if rule not in neurons.SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; choose from {sorted(neurons.SELECTION_RULES)}")
    if not caption_conditioning:
        raise ValueError("selection needs at least one caption")
    if not calibration_conditioning:
        raise ValueError("selection needs at least one calibration prompt")
    base, general, concept, layers = {}, {}, {}, {}
    caption_norms = neurons.feature_norms(caption_conditioning)  # once, for every layer
    calibration_norms = neurons.feature_norms(calibration_conditioning)
    for name, weight in weights.items():
        for norms in (caption_norms, calibration_norms):
            if norms.shape[-1] != weight.shape[-1]:
                raise ValueError(f"conditioning has {norms.shape[-1]} features, {name} expects {weight.shape[-1]}")
        base[name] = mask_for_prompts(weight, caption_conditioning, rule, value, caption_norms)
        general[name] = mask_for_prompts(weight, calibration_conditioning, rule, value, calibration_norms)
        concept[name] = neurons.concept_mask(base[name], general[name])
        earlier = neurons.or_masks((m[name] for m in earlier_masks), like=concept[name])
        layers[name] = {
            "elements": weight.numel(),
            "base": int(base[name].sum()),
            "general": int(general[name].sum()),
            "concept": int(concept[name].sum()),
            "overlap_with_earlier": int((concept[name] & earlier).sum()),
        }
    total = sum(v["elements"] for v in layers.values())
    counts = {key: sum(v[key] for v in layers.values()) for key in ("base", "general", "concept", "overlap_with_earlier")}
    base_total = counts["base"]
    report = {
        "rule": rule,
        "value": value,
        "captions": len(caption_conditioning),
        "calibration_prompts": len(calibration_conditioning),
        "elements": total,
        "counts": counts,
        "density": {key: counts[key] / total for key in ("base", "general", "concept")},
        "general_share_of_base": (int(sum(int((base[n] & general[n]).sum()) for n in weights)) / base_total)
        if base_total
        else 0.0,
        "overlap_share_of_concept": counts["overlap_with_earlier"] / counts["concept"] if counts["concept"] else 0.0,
        "layers": {
            name: dict(v, density_concept=v["concept"] / v["elements"]) for name, v in layers.items()
        },
    }
    return SelectionResult(base=base, general=general, concept=concept, report=report)
