"""The evaluation protocol of the paper (Sec. 5), mapped onto the tiny world.

A protocol says which continual sets of concepts are learned (one concept per task), which
prompts are drawn after each task (single-concept prompts for every concept learned so far;
multi-concept prompts after the last task; generic prompts for zero-shot preservation), how
many images per prompt (scored by their mean and by the paper's best-of-N), the training
budget every method gets, and the CLIP conventions. ``Protocol.describe()`` lists every
setting; the report prints it.

Presets: ``quick`` (one set of 7 concepts, few prompts and images, short training: every
method within about half an hour on 2 CPU cores on the tiny world); ``standard`` (the quick
sizes on all 3 sets, 6 multi-concept and 48 zero-shot prompts, run for seeds 0, 1 and 2: the
figures with intervals); ``long`` (every tiny-world concept, 16 tasks in one sequence, the
first concept scored after each task); ``paper`` (3 sets of 7, 35 single + 7 multi prompts per
set, 50 images per prompt, 500 steps).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

from .metrics import ClipSettings

__all__ = [
    "EvalConcept",
    "Protocol",
    "PRESETS",
    "preset",
    "TINY_WORLD_SETS",
    "TINY_WORLD_TEMPLATES",
    "single_prompts",
    "multi_prompts",
    "tiny_world_concepts",
]

KINDS = ("object", "creature", "style", "scene")


@dataclass(frozen=True)
class EvalConcept:
    """One concept of a protocol: its images (a folder of PNGs, optionally ``captions.json``)
    or, with ``images=None``, a tiny-world concept written on demand by name."""

    name: str
    kind: str  # object | creature | style | scene
    class_word: str
    images: Optional[str] = None
    class_prompt: Optional[str] = None  # prior-preservation prompt (default: from the kind)


# Three continual sets of 7 tiny-world concepts of mixed kinds (the paper's 3 sets of 7 out of 20
# concepts: sets overlap). The first concept of each set is the one whose forgetting curve is drawn.
TINY_WORLD_SETS: tuple[tuple[str, ...], ...] = (
    ("berry-heart", "starry-night", "halftone", "pip-bird", "tiger-star", "picnic-cloth", "mosaic"),
    ("bolt-robot", "harbor-stripes", "double-line", "ocean-ring", "clown-fish", "bubble-wall", "crosshatch"),
    ("beach-ball", "crosshatch", "bubble-wall", "clown-fish", "mint-gem", "starry-night", "halftone"),
)

# Single-concept prompts per kind, in the tiny world's caption grammar ({token} {word} names the concept).
TINY_WORLD_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": (
        "a big {token} {word} in the center, on a gray background, flat style",
        "a big {token} {word} on the left and a small blue ring on the right, on a beige background, flat style",
        "a small {token} {word} at the top, on a checkered background, outline style",
        "a big {token} {word} on the right, on a pink background, pixelated style",
        "a big {token} {word} at the bottom, on a navy background, hatched style",
    ),
    "creature": (
        "a big {token} {word} in the center, on a gray background, flat style",
        "a big {token} {word} on the right, on a pink background, flat style",
        "a small {token} {word} at the top, on a beige background, outline style",
        "a big {token} {word} on the left and a small red star on the right, on a grid background, flat style",
        "a big {token} {word} at the bottom, on a striped background, hatched style",
    ),
    "scene": (
        "a big white circle in the center, on a {token} {word}, flat style",
        "a small red star on the left, on a {token} {word}, flat style",
        "a big green heart on the right, on a {token} {word}, outline style",
        "a big orange bird at the top, on a {token} {word}, flat style",
        "a big yellow diamond at the bottom, on a {token} {word}, pixelated style",
    ),
    "style": (
        "a big red heart in the center, on a gray background, {token} {word}",
        "a big blue square on the left, on a beige background, {token} {word}",
        "a small green star at the top, on a pink background, {token} {word}",
        "a big orange robot on the right, on a checkered background, {token} {word}",
        "a big purple circle at the bottom, on a navy background, {token} {word}",
    ),
}

TINY_WORLD_CLASS_PROMPTS = {
    "object": "a big {word} in the center",
    "creature": "a big {word} in the center",
    "scene": "a big circle in the center, on a {word}",
    "style": "a big circle in the center, {word}",
}


@dataclass
class Protocol:
    """Every setting of an evaluation run (printed in the report)."""

    name: str = "custom"
    sets: list[list[str]] = field(default_factory=lambda: [list(s) for s in TINY_WORLD_SETS[:1]])
    single_prompts_per_concept: int = 2  # paper: 5 (35 per set of 7)
    multi_prompts_per_set: int = 3  # paper: 7, combining 2-4 concepts
    images_per_prompt: int = 4  # paper: 50, the best one kept (we report mean and best-of-N)
    reference_images: int = 5  # each concept's own images (3-6 in the tiny world)
    zero_shot_prompts: int = 8  # generic prompts naming no learned concept
    score_after_each_task: str = "all"  # "all" concepts learned so far, or only the "first" (long runs)
    # --- training: the same budget for every method ---
    steps: int = 150
    batch_size: int = 4
    lr_embedding: float = 1e-3  # higher pushes token rows past the vocabulary's norms (benchmarks/learning_sweep.py)
    lr_neurons: float = 1e-2  # CNS and its ablations (K/V elements); measured best on the tiny world
    select_ratio: float = 0.3  # CNS's per-caption share of each row (Sec. 4.2); 0.1 selects too few in a 128-wide model
    lr_lora: float = 1e-3  # LoRA methods (choice)
    lora_rank: int = 4
    clora_lambda: float = 1e6  # C-LoRA self-regularisation weight (choice: deltas are small)
    num_class_images: int = 8  # prior-preservation images per class prompt, shared by all methods
    prior_loss_weight: float = 1.0
    # --- sampling ---
    sample_steps: int = 25
    guidance: float = 4.0
    seed: int = 0
    # --- CLIP conventions ---
    clip_scale: float = 1.0
    clip_at_zero: bool = False
    replace_tokens_with_class: bool = True
    text_prefix: str = ""
    # --- prompts (kind -> templates with {token} and {word}) ---
    templates: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(TINY_WORLD_TEMPLATES))
    class_prompts: dict[str, str] = field(default_factory=lambda: dict(TINY_WORLD_CLASS_PROMPTS))

    @property
    def clip(self) -> ClipSettings:
        return ClipSettings(scale=self.clip_scale, clip_at_zero=self.clip_at_zero,
                            replace_tokens_with_class=self.replace_tokens_with_class, text_prefix=self.text_prefix)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["templates"] = {k: list(v) for k, v in self.templates.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Protocol":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        if "templates" in data:
            data["templates"] = {k: tuple(v) for k, v in data["templates"].items()}
        return cls(**data)

    def with_overrides(self, **overrides) -> "Protocol":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def training_signature(self) -> dict:
        """The settings that change what a method learns (a finished unit is reused only when
        these match)."""
        keys = ("steps", "batch_size", "lr_embedding", "lr_neurons", "select_ratio", "lr_lora", "lora_rank",
                "clora_lambda", "num_class_images", "prior_loss_weight", "seed", "class_prompts", "reference_images")
        return {k: getattr(self, k) for k in keys}

    def sampling_signature(self) -> dict:
        keys = ("single_prompts_per_concept", "multi_prompts_per_set", "images_per_prompt", "zero_shot_prompts",
                "score_after_each_task", "sample_steps", "guidance", "seed", "clip_scale", "clip_at_zero", "replace_tokens_with_class",
                "text_prefix")
        data = {k: getattr(self, k) for k in keys}
        data["templates"] = {k: list(v) for k, v in self.templates.items()}
        return data

    def describe(self) -> list[str]:
        """One line per setting, for the report."""
        lines = [
            f"protocol: {self.name}",
            f"continual sets: {len(self.sets)} x {', '.join(str(len(s)) for s in self.sets)} concepts, one per task",
        ]
        for k, s in enumerate(self.sets, 1):
            lines.append(f"set {k}: {' -> '.join(s)}")
        lines += [
            f"single-concept prompts per concept: {self.single_prompts_per_concept} "
            f"(per set: {self.single_prompts_per_concept * max((len(s) for s in self.sets), default=0)})",
            f"multi-concept prompts per set: {self.multi_prompts_per_set} (2-4 concepts each)",
            f"images per prompt: {self.images_per_prompt}, scored by the mean and by the best of N (paper: best of 50)",
            f"reference images per concept: {self.reference_images}",
            f"zero-shot prompts (no learned concept): {self.zero_shot_prompts}",
            "scored after each task: " + ("every concept learned so far" if self.score_after_each_task == "all"
                                          else "the first concept (every concept after the last task)"),
            f"training: {self.steps} steps, batch {self.batch_size} (+{self.batch_size} prior images), "
            f"lr embedding {self.lr_embedding:g}, lr K/V neurons {self.lr_neurons:g}, CNS select ratio "
            f"{self.select_ratio:g}, lr LoRA {self.lr_lora:g}, "
            f"LoRA rank {self.lora_rank}, C-LoRA lambda {self.clora_lambda:g}",
            f"prior preservation: {self.num_class_images} class images per class prompt (drawn once by the base "
            f"model, shared by every method), weight {self.prior_loss_weight:g}",
            f"sampling: DDIM {self.sample_steps} steps, guidance {self.guidance:g}, seeds {self.seed}.."
            f"{self.seed + self.images_per_prompt - 1} per prompt (the same for every method)",
            f"CLIP conventions: {self.clip.describe()}",
        ]
        return lines


# Every tiny-world concept in one continual sequence, kinds interleaved (the long run).
TINY_WORLD_LONG_SET: tuple[str, ...] = (
    "berry-heart", "starry-night", "halftone", "pip-bird", "tiger-star", "picnic-cloth", "mosaic", "bolt-robot",
    "harbor-stripes", "double-line", "ocean-ring", "clown-fish", "bubble-wall", "crosshatch", "beach-ball", "mint-gem",
)

# The seeds of the standard and long presets (each seed: its own concept images, training and sampling noise).
STANDARD_SEEDS = (0, 1, 2)


def preset(name: str) -> Protocol:
    """``quick``, ``standard``, ``long`` or ``paper`` (see the module docstring)."""
    if name == "quick":
        return Protocol(name="quick")
    if name == "standard":
        return Protocol(name="standard", sets=[list(s) for s in TINY_WORLD_SETS], multi_prompts_per_set=6,
                        zero_shot_prompts=48)
    if name == "long":
        return Protocol(name="long", sets=[list(TINY_WORLD_LONG_SET)], multi_prompts_per_set=6, zero_shot_prompts=48,
                        score_after_each_task="first")
    if name == "paper":
        return Protocol(
            name="paper",
            sets=[list(s) for s in TINY_WORLD_SETS],
            single_prompts_per_concept=5,
            multi_prompts_per_set=7,
            images_per_prompt=50,
            zero_shot_prompts=50,
            steps=500,
            num_class_images=50,
            sample_steps=50,
        )
    raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")


PRESETS = ("quick", "standard", "long", "paper")


def tiny_world_concepts(names) -> dict[str, EvalConcept]:
    """EvalConcepts for tiny-world concept names (images written on demand by the runner)."""
    from cns.world.concepts import get_concept

    out = {}
    for name in names:
        c = get_concept(name)
        out[name] = EvalConcept(name=c.name, kind=c.kind, class_word=c.class_word)
    return out


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------


def single_prompts(protocol: Protocol, concept: EvalConcept, token: str) -> list[str]:
    """The concept's single-concept prompts (the first ``single_prompts_per_concept`` templates
    of its kind, cycling when more are asked for)."""
    templates = protocol.templates[concept.kind]
    n = protocol.single_prompts_per_concept
    return [" ".join(templates[k % len(templates)].format(token=token, word=concept.class_word).split())
            for k in range(n)]


_POSITIONS_TWO = ("on the left", "on the right")


def multi_prompts(protocol: Protocol, concepts: list[EvalConcept], tokens: list[str]) -> list[tuple[str, list[int]]]:
    """Multi-concept prompts over a set: (prompt, indices of the concepts it names).

    Prompt k combines one or two subjects (objects or creatures) with a scene and / or a style
    (2 to 4 concepts), cycling through 7 shapes of combination; subjects, scenes and styles
    rotate with k so that the prompts cover the set's concepts.
    """
    subjects = [i for i, c in enumerate(concepts) if c.kind in ("object", "creature")]
    scenes = [i for i, c in enumerate(concepts) if c.kind == "scene"]
    styles = [i for i, c in enumerate(concepts) if c.kind == "style"]
    shapes = [(1, True, False), (1, False, True), (1, True, True), (2, False, False), (2, True, False),
              (2, False, True), (2, True, True)]
    out: list[tuple[str, list[int]]] = []
    turns = {"scene": 0, "style": 0}
    for k in range(7 * max(1, protocol.multi_prompts_per_set)):
        if len(out) >= protocol.multi_prompts_per_set:
            break
        n_subjects, with_scene, with_style = shapes[k % len(shapes)]
        if len(subjects) < n_subjects or (with_scene and not scenes) or (with_style and not styles):
            continue
        picked = [subjects[(k + m) % len(subjects)] for m in range(n_subjects)]
        if n_subjects == 1:
            parts = [f"a big {tokens[picked[0]]} {concepts[picked[0]].class_word} in the center"]
        else:
            parts = [" and ".join(f"a big {tokens[i]} {concepts[i].class_word} {pos}"
                                  for i, pos in zip(picked, _POSITIONS_TWO))]
        names = list(picked)
        if with_scene:
            scene = scenes[turns["scene"] % len(scenes)]
            turns["scene"] += 1
            parts.append(f"on a {tokens[scene]} {concepts[scene].class_word}")
            names.append(scene)
        else:
            parts.append("on a gray background")
        if with_style:
            style = styles[turns["style"] % len(styles)]
            turns["style"] += 1
            parts.append(f"{tokens[style]} {concepts[style].class_word}")
            names.append(style)
        else:
            parts.append("flat style")
        prompt = ", ".join(parts)
        if len(names) >= 2 and all(prompt != q for q, _ in out):
            out.append((prompt, names))
    return out


def resolve_folder(concept: EvalConcept, root: Path, n_images: int, seed: int = 0) -> Path:
    """The concept's image folder: its own, or the tiny-world concept written under ``root``."""
    if concept.images is not None:
        return Path(concept.images)
    from cns.world.concepts import get_concept, write_concept_folder

    folder = root / concept.name
    if not (folder / "concept.json").is_file():
        write_concept_folder(get_concept(concept.name), folder, n=n_images, seed=seed)
    return folder
