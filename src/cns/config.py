"""Settings of one CNS task: neuron selection (Sec. 4.2) and continual fine-tuning (Sec. 4.3).

Defaults follow the paper where it speaks (Adam, lr 5e-4 / 3e-5, 500 steps, K = 20
calibration prompts) and ``METHOD.md`` where it does not; the latter are marked (choice).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["LearnConfig"]


@dataclass
class LearnConfig:
    # --- selection (Eq. 3-6) ---
    select_rule: str = "top_ratio_per_row"  # (choice) Wanda's per-row comparison group
    select_ratio: float = 0.1  # (choice) share of each row kept per caption
    drop_padding: bool = False  # (choice) K/V see the padded sequence in the pipeline
    neurons: str = "concept"  # "concept" (CNS), "random" (same count per row), "all" (every K/V weight)
    # --- training (Eq. 7-8) ---
    steps: int = 500
    batch_size: int = 1  # instance images per step (plus as many class images)
    lr_embedding: float = 5e-4
    lr_neurons: float = 3e-5
    lambda_previous: float = 1.0  # (choice) l1 of Eq. 7
    lambda_pretrained: float = 0.1  # (choice) l2 of Eq. 7
    regularize: bool = True  # L_reg on (ablation: False)
    lambda_keep: float = 0.0  # (beyond the paper) weight of L_keep: holds earlier concepts' tokens' K/V; 0: off
    lambda_generic: float = 0.0  # (beyond the paper) weight of L_generic: holds generic prompts' K/V; 0: off
    generic_padding: bool = True  # L_generic also holds the padding positions of the generic prompts
    lambda_lock: float = 0.0  # (beyond the paper) weight of L_lock: a new token's keys held at its class word's; 0: off
    lambda_refit: float = 0.0  # (beyond the paper) after training, refit each masked row against generic prompts (cns.refit); 0: off
    train_embedding: bool = True
    prior_loss_weight: float = 1.0  # lambda of Eq. 8, as Custom Diffusion / DreamBooth
    num_class_images: int = 100  # (choice) Custom Diffusion uses 200
    class_image_steps: int = 50
    class_image_guidance: float = 6.0
    instance_template: str = "photo of a {token} {class_word}"
    class_template: str = "photo of a {class_word}"
    use_captions_in_training: bool = True  # train on captions with the token inserted, when captions exist
    resolution: int | None = None  # None: the UNet's native size
    flip: bool = False  # random horizontal flips (off: captions may say left / right)
    seed: int = 0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (through accelerate)
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, slower steps
    attention_slicing: str = "no"  # "no" | "auto" | "max": diffusers' sliced attention in the UNet while training
    device: str | None = None  # None: accelerate's choice (GPU when present)
    checkpoint_every: int = 0  # save a resumable checkpoint every N steps inside the library (0: never)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LearnConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def validate(self) -> None:
        from .errors import CNSError
        from .neurons import SELECTION_RULES

        for name in ("lr_embedding", "lr_neurons"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise CNSError(f"{_flag(name)} must be a finite learning rate > 0, got {value}")
        for name in ("lambda_previous", "lambda_pretrained", "lambda_keep", "lambda_generic", "lambda_lock", "lambda_refit",
                     "prior_loss_weight", "class_image_guidance",
                     "select_ratio"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise CNSError(f"{_flag(name)} must be a finite number >= 0, got {value}")
        if self.select_rule not in SELECTION_RULES:
            raise CNSError(f"unknown selection rule {self.select_rule!r}; choose from {', '.join(SELECTION_RULES)}")
        if self.select_rule != "threshold" and not 0 < self.select_ratio <= 1:
            raise CNSError(f"select ratio must lie in (0, 1], got {self.select_ratio}")
        if self.neurons not in ("concept", "random", "all"):
            raise CNSError(f"neurons must be concept, random or all, got {self.neurons!r}")
        if self.steps < 1:
            raise CNSError(f"--steps must be >= 1 (a concept needs training), got {self.steps}")
        if self.batch_size < 1:
            raise CNSError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.class_image_steps < 1:
            raise CNSError(f"--class-image-steps must be >= 1, got {self.class_image_steps}")
        if self.checkpoint_every < 0:
            raise CNSError(f"checkpoint every must be >= 0 steps (0: no checkpoints), got {self.checkpoint_every}")
        if self.resolution is not None and self.resolution < 1:
            raise CNSError(f"resolution must be a positive number of pixels, got {self.resolution}")
        if self.num_class_images < 0:
            raise CNSError(f"the number of class images must be >= 0, got {self.num_class_images}")
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise CNSError(f"unknown device {self.device!r} (e.g. cpu, cuda, cuda:1, mps)") from None
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise CNSError(f"mixed precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.attention_slicing not in ("no", "auto", "max"):
            raise CNSError(f"attention slicing must be no, auto or max, got {self.attention_slicing!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flag(name: str) -> str:
    """The command-line flag of a setting."""
    return "--" + name.replace("_", "-")


def resolve_device(device: str | None) -> "torch.device":
    """``device``, or where accelerate runs this process when it is None (a GPU when there is one)."""
    import torch

    if device:
        return torch.device(device)
    from accelerate import PartialState

    return PartialState().device
