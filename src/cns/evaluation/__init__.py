"""Evaluation: CLIP-I / CLIP-T scores, zero-shot attribute accuracy and continual-learning
summaries (`cns.evaluation.metrics`)."""

from cns.evaluation.metrics import (
    ClipScorer,
    ClipSettings,
    attribute_accuracy,
    average_score,
    backward_transfer,
    clip_i,
    clip_t,
    continual_summary,
    cosine_matrix,
    forgetting,
    multi_concept_clip_i,
    prepare_prompt,
    zero_shot_predict,
)

__all__ = [
    "ClipScorer",
    "ClipSettings",
    "attribute_accuracy",
    "average_score",
    "backward_transfer",
    "clip_i",
    "clip_t",
    "continual_summary",
    "cosine_matrix",
    "forgetting",
    "multi_concept_clip_i",
    "prepare_prompt",
    "zero_shot_predict",
]
