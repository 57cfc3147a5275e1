"""The tiny world's CLIP evaluator: a small CLIP-style dual encoder trained contrastively on
rendered scenes, a ``transformers.VisionTextDualEncoderModel`` with an EfficientNet image tower
and a CLIP text tower (``EvaluatorConfig``; ``image_tower="vit"`` gives a plain ``CLIPModel``,
the first evaluator's architecture, whose 16 px patches could not read the styles).

It plays the part real CLIP plays for Stable Diffusion: CLIP-I (image-image cosine), CLIP-T
(image-prompt cosine) and zero-shot attribute classification of generated images, loaded with
``cns.evaluation.ClipScorer.from_pretrained(EVALUATOR_PATH)`` like any CLIP checkpoint.

Training (``python -m cns.world.evaluator train --out DIR --steps N --seed S``; the three
commands in ``docs/world/quality.md`` reproduce the shipped weights):

- data: a pool of rendered scenes (pre-rendered once, cached on disk, reused across epochs)
  drawn from the whole base world (both sampler splits, so held-out (class, color) and
  (class, background) pairs are included; ``--no-heldout`` keeps them out), with 0 to 2
  decorations per object, some recolored creature parts, and some unnamed style and background
  recipes (never a personal concept's recipe, nor a look reserved for a personal concept);
- text: the full caption or a *partial* description (``a photo of a star``, ``a red object``,
  ``a small red star with white dots``, ``on a striped background``, ``outline style`` ...)
  drawn fresh every step, in exactly the prompt forms `attribute_prompts` evaluates with;
- loss: CLIP's symmetric InfoNCE with a learnable temperature, with multi-positive targets
  (each description is matched against every image of the batch, `Description.matches`, so a
  batch holding two stars does not teach "a photo of a star" to reject one of them); plus the
  zero-shot classification loss of each image against all attribute prompts, and auxiliary
  linear heads on the image embedding (attributes, decorations, part colors, style and
  background primitives; discarded after training). Without them the text tower cannot tell
  shape words apart until the image tower encodes shape, and vice versa: shape stays at chance.
  The shipped weights' last stage (``--recipe-weight 0.15 --style-balance 0.5``) adds a
  supervised contrastive loss among images of one style (`recipe_contrastive_loss`, images keyed
  by their style's primitives, `recipe_key`) and draws rare styles (cell gaps, halftone, double
  outlines) more often: without it CLIP-I hardly told the mosaic concept from the base styles.

``python -m cns.world.evaluator eval --model DIR`` prints zero-shot attribute accuracy on
fresh single-object renders (train and held-out split) and, for every personal concept,
CLIP-I among the concept's images versus CLIP-I against images of its plain class.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import string
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cns.world.dataset import CHUNK
from cns.world.recipes import PALETTE, PATTERNS, STYLE_FILLS, sample_novel_background, sample_novel_style
from cns.world.render import (
    BACKGROUNDS,
    Background,
    Style,
    COLORS,
    DECORATIONS,
    INCOMPATIBLE_DECORATIONS,
    MIN_COLOR_DISTANCE,
    OBJECT_CLASSES,
    POSITION_PAIRS,
    POSITION_PHRASES,
    POSITIONS,
    SIZES,
    STYLES,
    Decoration,
    ObjectSpec,
    Scene,
    caption,
    color_distance,
    decoration_phrase,
    has_enough_contrast,
    is_held_out,
    is_legible,
    render,
    sample_object,
    sample_scene,
    uses_reserved_look,
    vocabulary_words,
)

EVALUATOR_PATH = Path(__file__).resolve().parent / "weights" / "evaluator"
IMAGE_SIZE = 64
MAX_TEXT_LENGTH = 77
# The training pool is the union of one pool per version (version 1: base styles and backgrounds
# only; version 2: also recolored creature parts and unnamed style / background recipes).
POOL_VERSIONS: tuple[int, ...] = (1, 2)
TRAINING_VERSION = 3  # bump when training changes in a way a cached checkpoint must not resume across

# Extra words of the evaluator prompts (beyond the caption vocabulary), and every printable
# ASCII character as a one-character word so that punctuation, digits and personal tokens
# such as "<new1>" tokenize to known symbols instead of the unknown (= end-of-text) token.
PROMPT_WORDS: tuple[str, ...] = ("photo", "of", "object", "depicts", "picture", "image")
CHAR_WORDS: tuple[str, ...] = tuple(c for c in string.printable if not c.isspace())

# ---------------------------------------------------------------------------
# Zero-shot attribute prompts (training descriptions use the same forms)
# ---------------------------------------------------------------------------

ATTRIBUTE_LABELS: dict[str, tuple[str, ...]] = {
    "shape": OBJECT_CLASSES,
    "color": tuple(COLORS),
    "background": tuple(BACKGROUNDS),
    "style": tuple(STYLES),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shape_prompt(shape: str) -> str:
    """'a photo of a star' (also creatures: 'a photo of a robot')."""
    return f"a photo of {_article(shape)} {shape}"


def color_prompt(color: str) -> str:
    """'a red object', 'an orange object'."""
    return f"{_article(color)} {color} object"


def background_prompt(background: str) -> str:
    """'on a striped background'."""
    return f"on a {background} background"


def style_prompt(style: str) -> str:
    """'outline style'."""
    return f"{style} style"


_PROMPT_FUNCTIONS = {"shape": shape_prompt, "color": color_prompt, "background": background_prompt,
                     "style": style_prompt}


def attribute_prompts(attribute: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(labels, prompts) for one attribute: shape, color, background or style."""
    labels = ATTRIBUTE_LABELS[attribute]
    return labels, tuple(_PROMPT_FUNCTIONS[attribute](x) for x in labels)


def scene_attribute(scene: Scene, attribute: str) -> str:
    """The true label of a single-object scene for one attribute."""
    obj = scene.objects[0]
    return {"shape": obj.shape, "color": obj.color, "background": scene.background, "style": scene.style}[attribute]


# ---------------------------------------------------------------------------
# Training scenes
# ---------------------------------------------------------------------------


# Creature parts a training object may recolor (personal creatures recolor parts too).
RECOLORABLE_PARTS: dict[str, tuple[str, ...]] = {
    "robot": ("head", "arms", "tip", "legs"),
    "bird": ("head", "wing", "tail"),
    "fish": ("tail", "fin"),
}
NOVEL_STYLE_PROB = 0.2  # share of training scenes drawn in an unnamed style recipe
NOVEL_BACKGROUND_PROB = 0.2  # ... on an unnamed background recipe
PART_COLOR_PROB = 0.3  # share of creatures with recolored parts


def sample_training_object(
    rng: np.random.Generator, position: str, max_decorations: int = 2, part_color_prob: float = PART_COLOR_PROB
) -> ObjectSpec:
    """A base-world object with 0..max_decorations decorations (classes drawn uniformly);
    creatures sometimes have recolored parts."""
    shape = str(rng.choice(OBJECT_CLASSES))
    color = str(rng.choice(list(COLORS)))
    size = str(rng.choice(list(SIZES)))
    n_deco = int(rng.choice(3, p=(0.45, 0.35, 0.2)))
    n_deco = min(n_deco, max_decorations)
    kinds = [k for k in DECORATIONS if k not in INCOMPATIBLE_DECORATIONS.get(shape, ())]
    colors = [c for c in COLORS if color_distance(COLORS[c], COLORS[color]) >= MIN_COLOR_DISTANCE]
    chosen = rng.choice(len(kinds), size=n_deco, replace=False) if n_deco else []
    decorations = tuple(Decoration(kinds[int(k)], str(rng.choice(colors))) for k in chosen)
    parts: tuple[tuple[str, str], ...] = ()
    if shape in RECOLORABLE_PARTS and part_color_prob > 0 and rng.random() < part_color_prob:
        names = RECOLORABLE_PARTS[shape]
        picked = rng.choice(len(names), size=int(rng.integers(1, len(names) + 1)), replace=False)
        parts = tuple((names[int(k)], str(rng.choice([c for c in COLORS if c != color]))) for k in sorted(picked))
    offset = (float(rng.uniform(-0.02, 0.02)), float(rng.uniform(-0.02, 0.02)))
    return ObjectSpec(shape, color, size, position, decorations, part_colors=parts, offset=offset)


def sample_training_scene(
    rng: np.random.Generator, heldout: bool = True, one_object_prob: float = 0.6, version: int = 2
) -> Scene:
    """A random scene of the evaluator's training distribution.

    Like `sample_scene` but with up to two decorations per object, uniform classes, some
    recolored creature parts, and some unnamed style / background recipes (never those of a
    personal concept); with ``heldout`` the held-out combinations of the generator's
    pretraining split are allowed too. Looks reserved for personal concepts are never drawn.
    ``version=1`` draws no recolored parts and no unnamed recipes (the first pool's scenes).
    """
    extras = version >= 2
    for _ in range(10_000):
        if rng.random() < one_object_prob:
            positions: tuple[str, ...] = (str(rng.choice(list(POSITIONS))),)
        else:
            positions = POSITION_PAIRS[int(rng.integers(len(POSITION_PAIRS)))]
        objects = tuple(sample_training_object(rng, p, part_color_prob=PART_COLOR_PROB if extras else 0.0)
                        for p in positions)
        background: str | Background = str(rng.choice(list(BACKGROUNDS)))
        style: str | Style = str(rng.choice(list(STYLES)))
        if extras and rng.random() < NOVEL_BACKGROUND_PROB:
            background = sample_novel_background(rng)
        if extras and rng.random() < NOVEL_STYLE_PROB:
            style = sample_novel_style(rng)
        scene = Scene(objects, background, style)
        if uses_reserved_look(scene) or not has_enough_contrast(scene):
            continue
        if not heldout and is_held_out(scene):
            continue
        return scene
    raise RuntimeError("could not sample a training scene")


def _named(value) -> Optional[str]:
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------------------
# Descriptions: partial captions with the constraints they put on a scene
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectConstraint:
    """What a phrase says about one object (None: not said)."""

    shape: Optional[str] = None
    color: Optional[str] = None
    size: Optional[str] = None
    position: Optional[str] = None
    decorations: tuple[Decoration, ...] = ()

    def matches(self, obj: ObjectSpec) -> bool:
        return (
            (self.shape is None or obj.shape == self.shape)
            and (self.color is None or obj.color == self.color)
            and (self.size is None or obj.size == self.size)
            and (self.position is None or obj.position == self.position)
            and all(d in obj.decorations for d in self.decorations)
        )

    def phrase(self) -> str:
        words = [w for w in (self.size, self.color) if w]
        words.append(self.shape or "object")
        text = " ".join(words)
        text = f"{_article(text)} {text}"
        if self.decorations:
            text += " with " + " and ".join(decoration_phrase(d) for d in self.decorations)
        if self.position:
            text += " " + POSITION_PHRASES[self.position]
        return text


@dataclass(frozen=True)
class Description:
    """A text about a scene and the constraints it states (every one must hold)."""

    text: str
    objects: tuple[ObjectConstraint, ...] = ()
    background: Optional[str] = None
    style: Optional[str] = None

    def matches(self, scene: Scene) -> bool:
        if self.background is not None and scene.background != self.background:
            return False
        if self.style is not None and scene.style != self.style:
            return False
        return all(any(c.matches(o) for o in scene.objects) for c in self.objects)


def full_description(scene: Scene) -> Description:
    """The scene's full caption (decorations stated are required; unstated ones are not excluded)."""
    objects = tuple(ObjectConstraint(o.shape, o.color, o.size, o.position, o.decorations) for o in scene.objects)
    return Description(caption(scene), objects, _named(scene.background), _named(scene.style))


def _partial_object(rng: np.random.Generator, obj: ObjectSpec) -> ObjectConstraint:
    decorations: tuple[Decoration, ...] = ()
    if obj.decorations and rng.random() < 0.4:
        decorations = obj.decorations if rng.random() < 0.6 else (obj.decorations[int(rng.integers(len(obj.decorations)))],)
    return ObjectConstraint(
        shape=obj.shape if rng.random() < 0.7 else None,
        color=obj.color if rng.random() < 0.6 else None,
        size=obj.size if rng.random() < 0.25 else None,
        position=obj.position if rng.random() < 0.25 else None,
        decorations=decorations,
    )


def _personal_form(rng: np.random.Generator, scene: Scene) -> Description:
    """A caption in the form personal-concept captions take: class words, unnamed slots."""
    objs = []
    for o in scene.objects:
        if rng.random() < 0.5:
            objs.append(ObjectConstraint(o.shape, None, o.size, o.position))
        else:
            objs.append(ObjectConstraint(o.shape, o.color, o.size, o.position, o.decorations))
    keep_bg = rng.random() < 0.5 and _named(scene.background) is not None
    keep_style = rng.random() < 0.5 and _named(scene.style) is not None
    bg_part = f"on a {scene.background} background" if keep_bg else "on a background"
    style_part = f"{scene.style} style" if keep_style else "style"
    text = " and ".join(c.phrase() for c in objs) + f", {bg_part}, {style_part}"
    return Description(text, tuple(objs), scene.background if keep_bg else None, scene.style if keep_style else None)


def sample_description(rng: np.random.Generator, scene: Scene) -> Description:
    """A random true description of a scene: its caption, a personal-style caption, or a
    partial description in the prompt forms of `attribute_prompts` (and combinations)."""
    u = rng.random()
    if u < 0.25:
        return full_description(scene)
    if u < 0.32:
        return _personal_form(rng, scene)
    if u < 0.55:  # single-attribute prompts, exactly the zero-shot forms
        named = [a for a in ATTRIBUTE_LABELS if a not in ("background", "style") or _named(getattr(scene, a))]
        attribute = str(rng.choice(named))
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        if attribute == "shape":
            return Description(shape_prompt(obj.shape), (ObjectConstraint(shape=obj.shape),))
        if attribute == "color":
            return Description(color_prompt(obj.color), (ObjectConstraint(color=obj.color),))
        if attribute == "background":
            return Description(background_prompt(str(scene.background)), background=str(scene.background))
        return Description(style_prompt(str(scene.style)), style=str(scene.style))
    # combination: object phrase(s) and/or background and/or style
    parts: list[str] = []
    objects: list[ObjectConstraint] = []
    bg_named, style_named = _named(scene.background) is not None, _named(scene.style) is not None
    if rng.random() < 0.8 or not bg_named:
        chosen = scene.objects if (len(scene.objects) > 1 and rng.random() < 0.3) else \
            (scene.objects[int(rng.integers(len(scene.objects)))],)
        objects = [_partial_object(rng, o) for o in chosen]
        phrase = " and ".join(c.phrase() for c in objects)
        if rng.random() < 0.3:
            phrase = "a photo of " + phrase
        parts.append(phrase)
    background = style = None
    if bg_named and (rng.random() < 0.45 or not parts):
        background = str(scene.background)
        parts.append(background_prompt(background))
    if style_named and rng.random() < 0.45:
        style = str(scene.style)
        parts.append(style_prompt(style))
    return Description(", ".join(parts), tuple(objects), background, style)


def match_matrix(descriptions: Sequence[Description], scenes: Sequence[Scene]) -> np.ndarray:
    """(n_texts, n_images) boolean matrix: description j is true of scene i."""
    return np.array([[d.matches(s) for s in scenes] for d in descriptions], dtype=bool)


# ---------------------------------------------------------------------------
# Pool of rendered training scenes (cached on disk, chunked, deterministic per seed)
# ---------------------------------------------------------------------------

def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "cns" / "evaluator"


def chunk_scenes(seed: int, chunk: int, heldout: bool = True, version: int = 2) -> list[Scene]:
    """The scenes of one pool chunk (deterministic for seed, chunk index and pool version)."""
    rng = np.random.default_rng([seed, version, chunk, int(heldout)])
    return [sample_training_scene(rng, heldout, version=version) for _ in range(CHUNK)]


def pool_folder(cache_dir: str | Path | None, version: int, seed: int, heldout: bool) -> Path:
    """Where `build_pool` caches one pool version's chunks."""
    return Path(cache_dir or default_cache_dir()) / f"pool_v{version}_seed{seed}_h{int(heldout)}"


def legible_mask(scenes: Sequence[Scene], cache: str | Path | None = None, workers: int = 1,
                 progress: bool = True) -> np.ndarray:
    """Whether each scene's render shows what its caption names (`is_legible`), as a bool array,
    cached as ``.npy`` at ``cache`` (a pool's scenes are a pure function of its seed and version)."""
    import multiprocessing as mp

    from tqdm import tqdm

    if cache is not None and Path(cache).exists():
        mask = np.load(cache)
        if len(mask) == len(scenes):
            return mask
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            marks = list(tqdm(pool.imap(is_legible, scenes, chunksize=250), total=len(scenes), disable=not progress,
                              desc="checking legibility"))
    else:
        marks = [is_legible(s) for s in tqdm(scenes, disable=not progress, desc="checking legibility")]
    mask = np.asarray(marks, bool)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, mask)
    return mask


def build_pool(
    n: int, seed: int, heldout: bool = True, cache_dir: str | Path | None = None, workers: int = 1,
    progress: bool = True, version: int = 2,
) -> tuple[list[Scene], np.ndarray]:
    """(scenes, uint8 images (n, 64, 64, 3)) of the training pool, rendering missing chunks.

    Chunks are cached as .npy files, so an interrupted build resumes; rendering happens in
    ``workers`` subprocesses (default 1: leaves the other cores to whatever else runs).
    """
    from functools import partial

    from cns.world.dataset import render_chunks

    folder = pool_folder(cache_dir, version, seed, heldout)
    return render_chunks(folder, partial(chunk_scenes, seed, heldout=heldout, version=version), n, IMAGE_SIZE,
                         workers, progress, desc=f"rendering pool ({CHUNK} scenes a chunk)")


# ---------------------------------------------------------------------------
# Model, tokenizer, processor
# ---------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class EvaluatorConfig:
    """Architecture of the evaluator: an image tower on 64 px images and a small CLIP text tower.

    ``image_tower="vit"`` is a ``CLIPModel`` (ViT patches of ``patch_size``); ``"efficientnet"``
    is a ``VisionTextDualEncoderModel`` with an ``EfficientNetModel`` tower (MBConv stages
    ``effnet_*``, channels scaled by ``effnet_width``, global ``effnet_pooling``), whose 3 x 3
    convolutions see the styles' strokes and pixel cells that 16 px ViT patches blur
    (docs/world/quality.md)."""

    image_tower: str = "efficientnet"  # the shipped evaluator's; "vit" is the other choice
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 6
    vision_mlp: int = 768
    patch_size: int = 16  # 4 x 4 tokens: learns shapes several times faster per sample than 8 x 8, and is cheaper
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_mlp: int = 512
    projection_dim: int = 128
    effnet_width: float = 0.5
    effnet_in: tuple[int, ...] = (32, 32, 48, 96, 160)
    effnet_out: tuple[int, ...] = (32, 48, 96, 160, 224)
    effnet_strides: tuple[int, ...] = (1, 1, 2, 2, 2)  # after the stride-2 stem: 32, 32, 16, 8, 4 px maps
    effnet_repeats: tuple[int, ...] = (1, 1, 2, 2, 1)
    effnet_expand: tuple[int, ...] = (1, 4, 4, 4, 4)
    effnet_pooling: str = "max"  # "is it anywhere": objects are small, mean pooling learns shapes slower


IMAGE_TOWERS = ("vit", "efficientnet")


def reset_to_torch_defaults(module) -> None:
    """Re-initialise convolutions, linear and norm layers as PyTorch does. transformers draws
    every weight of these towers, BatchNorm scales included, from N(0, 0.02) (made for loading
    pretrained weights over it): through 7 blocks the activations fall to 1e-23, and such a
    tower learned nothing in 300 steps."""
    import torch

    for layer in module.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
            layer.reset_parameters()


def build_tokenizer(save_to: str | Path | None = None):
    """The evaluator's CLIP tokenizer: caption vocabulary + prompt words + ASCII characters."""
    from cns.world.tokenizer import build_clip_tokenizer

    words = list(vocabulary_words()) + list(PROMPT_WORDS) + list(CHAR_WORDS)
    return build_clip_tokenizer(words, model_max_length=MAX_TEXT_LENGTH, save_to=save_to)


def build_processor(tokenizer):
    """A ``CLIPProcessor`` resizing (short side, bicubic) and centre-cropping to 64 px, CLIP-normalised."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_model(tokenizer, config: EvaluatorConfig = EvaluatorConfig()):
    """A randomly initialised dual encoder of the given architecture: a ``CLIPModel`` (ViT tower)
    or a ``VisionTextDualEncoderModel`` (EfficientNet tower, CLIP text tower). Both load with
    ``transformers.AutoModel`` and have ``get_image_features`` / ``get_text_features``."""
    from transformers import CLIPConfig, CLIPModel

    if config.image_tower not in IMAGE_TOWERS:
        raise ValueError(f"image_tower must be one of {IMAGE_TOWERS}, got {config.image_tower!r}")
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=config.text_mlp,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=MAX_TEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if config.image_tower == "efficientnet":
        from transformers import (CLIPTextConfig, EfficientNetConfig, VisionTextDualEncoderConfig,
                                  VisionTextDualEncoderModel)

        from transformers.models.efficientnet.modeling_efficientnet import round_filters

        vision = EfficientNetConfig(
            num_channels=3, image_size=IMAGE_SIZE, width_coefficient=config.effnet_width, depth_coefficient=1.0,
            in_channels=list(config.effnet_in), out_channels=list(config.effnet_out),
            strides=list(config.effnet_strides), num_block_repeats=list(config.effnet_repeats),
            kernel_sizes=[3] * len(config.effnet_in), expand_ratios=list(config.effnet_expand),
            pooling_type=config.effnet_pooling, batch_norm_momentum=0.1, drop_connect_rate=0.0, dropout_rate=0.0)
        # The top convolution has round_filters(1280) channels, and its BatchNorm hidden_dim: they
        # must agree. ``hidden_size`` (the pooled width) is what the dual encoder's projection reads.
        vision.hidden_dim = vision.hidden_size = round_filters(vision, 1280)
        dual = VisionTextDualEncoderConfig.from_vision_text_configs(
            vision, CLIPTextConfig(**text), projection_dim=config.projection_dim)
        model = VisionTextDualEncoderModel(dual)
        reset_to_torch_defaults(model.vision_model)
        return model
    vision = dict(
        hidden_size=config.vision_hidden,
        intermediate_size=config.vision_mlp,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=config.patch_size,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.projection_dim))


def pixel_values(images: np.ndarray):
    """uint8 (N, 64, 64, 3) renders -> CLIP-normalised float (N, 3, 64, 64), the processor's math."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def shift_images(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Translate each (H, W, 3) image by its (dy, dx) pixels, wrapping around (augmentation: the
    ViT's 16 px patches then see every edge at every offset; backgrounds are periodic)."""
    out = np.empty_like(images)
    for i, (dy, dx) in enumerate(shifts):
        out[i] = np.roll(images[i], (int(dy), int(dx)), axis=(0, 1))
    return out


def at_resolution(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, 64, 64, 3) renders as a ``size`` px model sees and draws them, brought back to
    64 px as the evaluator's processor does: Lanczos down (``pretrain.resize_images``, the
    pretraining pool's resize), bicubic up (``CLIPImageProcessor``'s resample)."""
    from PIL import Image

    from cns.world.pretrain import resize_images

    if len(images) == 0 or size == images.shape[1]:
        return images
    full = images.shape[1]
    return np.stack([np.asarray(Image.fromarray(im).resize((full, full), Image.BICUBIC))
                     for im in resize_images(images, size)])


def _soft_cross_entropy(logits, targets):
    """Cross-entropy of each row against the uniform distribution over its positives
    (rows without a positive are left out)."""
    import torch

    count = targets.sum(dim=1, keepdim=True)
    keep = count[:, 0] > 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    t = targets[keep] / count[keep]
    return -(t * torch.log_softmax(logits[keep], dim=1)).sum(dim=1).mean()


def contrastive_loss(image_emb, text_emb, logit_scale, matches):
    """Symmetric InfoNCE with multi-positive targets; ``matches`` is (n_texts, n_images) bool."""
    import torch

    img = torch.nn.functional.normalize(image_emb, dim=-1)
    txt = torch.nn.functional.normalize(text_emb, dim=-1)
    logits_t = logit_scale.exp() * txt @ img.T
    m = matches.float()
    return 0.5 * (_soft_cross_entropy(logits_t, m) + _soft_cross_entropy(logits_t.T, m.T))


def recipe_contrastive_loss(image_emb, keys: Sequence, temperature: float = 0.5):
    """Supervised contrastive loss (Khosla et al. 2020, Eq. 2, "L_out") among the images of a batch:
    images whose ``keys`` are equal (`recipe_key`: the same style, say) are positives, all others
    negatives; anchors without a positive are left out. It gives CLIP-I what real CLIP-I has and
    captions alone do not teach: two images in one rendering style are closer than the same
    images in two styles, for unnamed recipes too."""
    import torch

    emb = torch.nn.functional.normalize(image_emb, dim=-1)
    n = len(keys)
    codes = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    label = torch.tensor([codes[k] for k in keys])
    eye = torch.eye(n, dtype=torch.bool)
    positives = (label[:, None] == label[None, :]) & ~eye
    logits = (emb @ emb.T / temperature).masked_fill(eye, -1e4)  # (not -inf: 0 * -inf is nan)
    return _soft_cross_entropy(logits, positives.float())


# What `recipe_key` can key images on: the primitives of the style recipe, of the background
# recipe (the heads' ``style_*`` / ``bg_*`` groups, so near-identical recipes such as pixel cells
# of 12 and 14 are one key), or the objects' looks (class, color, decorations, part colors).
RECIPE_FACTORS: dict[str, tuple[str, ...]] = {
    "style": ("style_fill", "style_outlines", "style_pixels", "style_gaps"),
    "background": ("bg_pattern", "bg_base", "bg_ink", "bg_period", "bg_diagonal"),
    "objects": (),
}


def recipe_key(scene: Scene, factor: str):
    """A hashable key of one factor of a scene (`RECIPE_FACTORS`): equal keys look alike."""
    if factor == "objects":
        return frozenset((o.shape, o.color, frozenset((d.kind, d.color) for d in o.decorations),
                          frozenset(o.part_colors)) for o in scene.objects)
    return tuple(frozenset(_scene_labels(scene, group)) for group in RECIPE_FACTORS[factor])


def style_balanced_weights(scenes: Sequence[Scene], power: float) -> np.ndarray:
    """Probabilities of drawing each scene, proportional to ``count ** -power`` where ``count`` is
    how many of ``scenes`` share its style key (`recipe_key`): 0 draws uniformly, 1 gives every
    style key the same share."""
    from collections import Counter

    keys = [recipe_key(s, "style") for s in scenes]
    counts = Counter(keys)
    weights = np.array([float(counts[k]) ** -power for k in keys])
    return weights / weights.sum()


def attribute_targets(scenes: Sequence[Scene]):
    """{attribute: (n_scenes, n_labels) float multi-hot} of the labels present in each scene."""
    import torch

    out = {}
    for attribute, labels in ATTRIBUTE_LABELS.items():
        t = torch.zeros(len(scenes), len(labels))
        for i, scene in enumerate(scenes):
            present = _scene_labels(scene, attribute)
            for k, label in enumerate(labels):
                t[i, k] = float(label in present)
        out[attribute] = t
    return out


# Labels of the auxiliary linear heads (used in training only, not saved): single-choice groups
# get a softmax over the labels present in the scene (scenes with none are left out), multi-label
# groups a sigmoid per label. Style and background recipes are also described by their
# primitives, so that unnamed recipes (and personal styles / scenes) are told apart too.
HEAD_GROUPS: dict[str, tuple[str, ...]] = {
    "shape": OBJECT_CLASSES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
    "style": tuple(STYLES),
    "decoration": DECORATIONS,
    "decoration_color": tuple(COLORS),
    "part_color": tuple(COLORS),
    "style_fill": STYLE_FILLS,
    "style_outlines": ("0", "1", "2"),
    "style_pixels": ("none", "coarse", "fine"),
    "style_gaps": ("no", "yes"),
    "bg_pattern": PATTERNS,
    "bg_base": tuple(str(k) for k in range(len(PALETTE))),
    "bg_ink": tuple(str(k) for k in range(len(PALETTE))),
    "bg_period": ("coarse", "medium", "fine"),
    "bg_diagonal": ("no", "yes"),
}
MULTI_LABEL_GROUPS = ("decoration", "decoration_color", "part_color")
# "basic": the named attributes and decorations only; "full": also part colors and primitives.
HEAD_SETS: dict[str, tuple[str, ...]] = {
    "basic": ("shape", "color", "size", "position", "background", "style", "decoration", "decoration_color"),
    "full": tuple(HEAD_GROUPS),
}


def _nearest_palette(rgb) -> str:
    return str(min(range(len(PALETTE)), key=lambda k: color_distance(PALETTE[k], rgb)))


def _scene_labels(scene: Scene, group: str) -> set[str]:
    """The head labels of one group present in a scene (empty: not applicable)."""
    from cns.world.render import background_recipe, style_recipe

    if group in ("background", "style"):
        return {v} if (v := _named(getattr(scene, group))) else set()
    if group == "decoration":
        return {d.kind for o in scene.objects for d in o.decorations}
    if group == "decoration_color":
        return {d.color for o in scene.objects for d in o.decorations}
    if group == "part_color":
        return {c for o in scene.objects for _, c in o.part_colors}
    if group in ("shape", "color", "size", "position"):
        return {getattr(o, group) for o in scene.objects}
    st, bg = style_recipe(scene.style), background_recipe(scene.background)
    if group == "style_fill":
        return {st.fill}
    if group == "style_outlines":
        return {str(st.outlines)}
    if group == "style_pixels":
        return {"none" if not st.pixel_cells else ("coarse" if st.pixel_cells <= 16 else "fine")}
    if group == "style_gaps":
        return {"yes" if st.cell_gaps else "no"}
    if group == "bg_pattern":
        return {bg.pattern}
    if group == "bg_base":
        return {_nearest_palette(bg.base)}
    if bg.pattern == "plain":
        return set()
    if group == "bg_ink":
        return {_nearest_palette(bg.ink)}
    if group == "bg_period":
        return {"coarse" if bg.period >= 0.2 else ("medium" if bg.period >= 0.15 else "fine")}
    if group == "bg_diagonal":
        return {"yes" if bg.diagonal else "no"} if bg.pattern == "stripes" else set()
    raise KeyError(group)


def head_targets(scenes: Sequence[Scene], groups: Sequence[str] = tuple(HEAD_GROUPS)) -> dict:
    """{group: (n_scenes, n_labels) multi-hot} of the labels present in each scene."""
    import torch

    out = {}
    for group in groups:
        labels = HEAD_GROUPS[group]
        t = torch.zeros(len(scenes), len(labels))
        index = {label: k for k, label in enumerate(labels)}
        for i, scene in enumerate(scenes):
            for label in _scene_labels(scene, group):
                t[i, index[label]] = 1.0
        out[group] = t
    return out


def make_heads(dim: int, groups: Sequence[str] = tuple(HEAD_GROUPS)):
    """Auxiliary linear heads on the (unnormalised) image embedding: they give the image tower a
    direct signal for every attribute from the first step, which the contrastive loss alone
    lacks while the text tower cannot yet tell the attribute words apart."""
    import torch

    return torch.nn.Linear(dim, sum(len(HEAD_GROUPS[g]) for g in groups))


def head_loss(logits, targets: dict, groups: Sequence[str] = tuple(HEAD_GROUPS)):
    import torch

    losses, start = [], 0
    for group in groups:
        labels = HEAD_GROUPS[group]
        part, t = logits[:, start : start + len(labels)], targets[group]
        start += len(labels)
        if group in MULTI_LABEL_GROUPS:
            losses.append(torch.nn.functional.binary_cross_entropy_with_logits(part, t))
        else:
            losses.append(_soft_cross_entropy(part, t))
    return sum(losses) / len(losses)


def attribute_loss(image_emb, prompt_emb, logit_scale, targets, slices):
    """Zero-shot classification loss: each image against every prompt of each attribute."""
    import torch

    img = torch.nn.functional.normalize(image_emb, dim=-1)
    txt = torch.nn.functional.normalize(prompt_emb, dim=-1)
    logits = logit_scale.exp() * img @ txt.T
    losses = [_soft_cross_entropy(logits[:, sl], targets[a]) for a, sl in slices.items()]
    return sum(losses) / len(losses)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


class _Monitor:
    """Zero-shot accuracy on a small fixed set of single-object scenes, printed during training
    (its own seed: these are not the renders `evaluate` reports)."""

    def __init__(self, tokenizer, seed: int, n: int = 200, low_res_size: int = 32):
        import torch

        rng = np.random.default_rng([seed, 4])
        splits = ["train" if rng.random() < 0.5 else "heldout" for _ in range(n)]
        self.scenes = [sample_scene(rng, sp, n_objects=1) for sp in splits]
        renders = np.stack([np.asarray(render(s, IMAGE_SIZE)) for s in self.scenes])
        self.pixels = pixel_values(renders)
        self.low_res_size = low_res_size
        self.low_pixels = pixel_values(at_resolution(renders, low_res_size))
        self.tokens = {}
        for attribute in ATTRIBUTE_LABELS:
            labels, prompts = attribute_prompts(attribute)
            self.tokens[attribute] = (labels, tokenizer(list(prompts), padding=True, return_tensors="pt"))
        self.torch = torch

    def __call__(self, model) -> str:
        from cns.evaluation.metrics import projected_features

        torch = self.torch
        was_training = model.training
        model.eval()
        with torch.no_grad():
            prompts = {attribute: torch.nn.functional.normalize(projected_features(model.get_text_features(
                input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])), dim=-1)
                for attribute, (_, tok) in self.tokens.items()}
            parts = []
            for pixels, suffix in ((self.pixels, ""), (self.low_pixels, f" ({self.low_res_size} px)")):
                img = torch.nn.functional.normalize(projected_features(model.get_image_features(pixel_values=pixels)), dim=-1)
                for attribute, (labels, _) in self.tokens.items():
                    pred = (img @ prompts[attribute].T).argmax(1).tolist()
                    acc = np.mean([labels[p] == scene_attribute(s, attribute) for p, s in zip(pred, self.scenes)])
                    parts.append(f"{attribute}{suffix} {acc:.3f}")
        model.train(was_training)
        return ", ".join(parts)


def save_evaluator(model, processor, out: str | Path, max_mb: float = 10.0) -> Path:
    """Save model (safetensors; float16 if float32 would exceed ``max_mb``) + processor files."""
    import copy

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    to_save = model if n_bytes <= max_mb * 1e6 * 0.95 else copy.deepcopy(model).half()
    to_save.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def train(
    out: str | Path,
    steps: int = 6000,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    attribute_weight: float = 1.0,
    head_weight: float = 1.0,
    weight_decay: float = 0.05,
    pool_size: int = 64000,
    max_shift: int = 4,
    workers: int = 1,
    threads: int = 1,
    heldout: bool = True,
    cache_dir: str | Path | None = None,
    checkpoint_every: int = 200,
    config: EvaluatorConfig = EvaluatorConfig(),
    progress: bool = True,
    eval_every: int = 500,
    tokenizer_path: str | Path | None = None,
    pool_versions: Sequence[int] = POOL_VERSIONS,
    head_set: str = "full",
    init_from: str | Path | None = None,
    low_res_fraction: float = 0.3,
    low_res_size: int = 32,
    legible_only: bool = False,
    recipe_weight: float = 0.0,
    recipe_factors: Sequence[str] = ("style",),
    recipe_temperature: float = 0.5,
    style_balance: float = 0.0,
) -> Path:
    """Train the evaluator and save it to ``out``. Deterministic for a seed (batches and texts
    of step k depend only on (seed, k)); resumes from ``<cache>/run_t<version>_seed<seed>_h<0|1>/``.

    ``low_res_fraction`` of each batch is shown at ``low_res_size`` px (`at_resolution`): the
    images a tiny-world model generates are 32 px, and an evaluator that only ever saw 64 px
    renders reads their style poorly. ``legible_only`` trains on the pool's scenes whose render
    shows what their caption names (`is_legible`, which the world's sampler applies).
    ``recipe_weight`` adds `recipe_contrastive_loss` at ``recipe_temperature``, averaged over the
    ``recipe_factors`` the images are keyed on (`recipe_key`). ``style_balance`` > 0 draws each
    batch's scenes with probability proportional to ``count ** -style_balance``, ``count`` being
    how many pool scenes share the scene's style key: rare primitives (cell gaps, halftone,
    double outlines) are then seen more often (1: every style key equally often)."""
    import torch

    from cns.evaluation.metrics import projected_features
    from cns.world.checkpoints import load_checkpoint, read_checkpoint_info, save_checkpoint
    from tqdm import tqdm
    from transformers import CLIPTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cache = Path(cache_dir or default_cache_dir())
    scenes, images = [], []
    for version in pool_versions:
        v_scenes, v_images = build_pool(pool_size // len(pool_versions), seed, heldout, cache, workers, progress,
                                        version=version)
        if legible_only:
            keep = legible_mask(v_scenes, pool_folder(cache, version, seed, heldout) / f"legible_{len(v_scenes)}.npy",
                                workers, progress)
            v_scenes, v_images = [sc for sc, k in zip(v_scenes, keep) if k], v_images[keep]
        scenes += v_scenes
        images.append(v_images)
    images = np.concatenate(images)
    draw = style_balanced_weights(scenes, style_balance) if style_balance else None
    tower = "" if init_from or config.image_tower == "vit" else f"_{config.image_tower}"
    tower += "_legible" if legible_only else ""
    tower += f"_recipe{recipe_weight:g}" if recipe_weight else ""
    tower += f"_balance{style_balance:g}" if style_balance else ""
    run_dir = cache / f"run_t{TRAINING_VERSION}_seed{seed}_h{int(heldout)}{tower}"
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = run_dir / "tokenizer"
    meta = {"training_version": TRAINING_VERSION, "steps": steps, "batch_size": batch_size, "lr": lr,
            "max_shift": max_shift,
            "attribute_weight": attribute_weight, "head_weight": head_weight, "pool_size": pool_size,
            "config": config.__dict__, "pool_versions": list(pool_versions), "head_set": head_set,
            "init_from": str(init_from) if init_from else None}
    if low_res_fraction:  # (absent when off, so runs from before the option still resume)
        meta.update(low_res_fraction=low_res_fraction, low_res_size=low_res_size)
    if legible_only:
        meta.update(legible_only=True, pool_scenes=len(scenes))
    if style_balance:
        meta.update(style_balance=style_balance)
    if recipe_weight:
        meta.update(recipe_weight=recipe_weight, recipe_factors=list(recipe_factors),
                    recipe_temperature=recipe_temperature)
    meta = json.loads(json.dumps(meta))  # as it reads back from the checkpoint's JSON
    info = read_checkpoint_info(run_dir, "checkpoint")
    resume = info is not None and info.get("meta") == meta and tokenizer_dir.exists()
    # BPE training breaks ties differently from one process to the next, so token ids are not
    # reproducible: a resumed run reuses the tokenizer it started with, and ``tokenizer_path``
    # (e.g. the shipped evaluator folder) reproduces a given model exactly.
    if resume:
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    else:
        source = init_from or tokenizer_path  # a model's weights only make sense with its own tokenizer
        tokenizer = CLIPTokenizer.from_pretrained(str(source)) if source else build_tokenizer()
        tokenizer.save_pretrained(str(tokenizer_dir))
    processor = build_processor(tokenizer)
    if init_from:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(init_from)).float()
    else:
        model = build_model(tokenizer, config)
    groups = HEAD_SETS[head_set]
    heads = make_heads(int(model.config.projection_dim), groups)
    named = list(model.named_parameters()) + [("heads." + n, p) for n, p in heads.named_parameters()]
    decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6,
    )
    all_prompts, slices = [], {}
    for attribute in ATTRIBUTE_LABELS:
        prompts = attribute_prompts(attribute)[1]
        slices[attribute] = slice(len(all_prompts), len(all_prompts) + len(prompts))
        all_prompts += prompts
    prompt_tokens = tokenizer(all_prompts, padding=True, return_tensors="pt")
    modules = {"model": model, "heads": heads}
    start = load_checkpoint(run_dir, "checkpoint", modules, optimizer) if resume else 0
    if start:
        print(f"resuming from step {start}")
    warmup = max(1, min(200, steps // 10))
    monitor = _Monitor(tokenizer, seed, low_res_size=low_res_size) if eval_every else None
    model.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc="training evaluator")
    started = time.time()
    for step in bar:
        rng = np.random.default_rng([seed, 1, step])
        idx = np.sort(rng.choice(len(scenes), batch_size, replace=False, p=draw))
        batch_scenes = [scenes[i] for i in idx]
        descriptions = [sample_description(rng, s) for s in batch_scenes]
        matches = torch.from_numpy(match_matrix(descriptions, batch_scenes))
        tokens = tokenizer([d.text for d in descriptions], padding=True, truncation=True, return_tensors="pt")
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        batch_images = images[idx]
        if max_shift:
            batch_images = shift_images(batch_images, rng.integers(-max_shift, max_shift + 1, size=(len(idx), 2)))
        if low_res_fraction:
            low = rng.random(len(idx)) < low_res_fraction
            batch_images[low] = at_resolution(batch_images[low], low_res_size)
        image_emb = projected_features(model.get_image_features(pixel_values=pixel_values(batch_images)))
        text_emb = projected_features(model.get_text_features(input_ids=tokens["input_ids"],
                                                              attention_mask=tokens["attention_mask"]))
        loss = contrastive_loss(image_emb, text_emb, model.logit_scale, matches)
        if attribute_weight:
            prompt_emb = projected_features(model.get_text_features(input_ids=prompt_tokens["input_ids"],
                                                                    attention_mask=prompt_tokens["attention_mask"]))
            loss = loss + attribute_weight * attribute_loss(image_emb, prompt_emb, model.logit_scale,
                                                            attribute_targets(batch_scenes), slices)
        if head_weight:
            loss = loss + head_weight * head_loss(heads(image_emb), head_targets(batch_scenes, groups), groups)
        if recipe_weight:
            loss = loss + recipe_weight * sum(
                recipe_contrastive_loss(image_emb, [recipe_key(s, f) for s in batch_scenes], recipe_temperature)
                for f in recipe_factors) / len(recipe_factors)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save_checkpoint(run_dir, "checkpoint", modules, optimizer, step + 1, {"meta": meta})
        if monitor is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
            bar.write(f"step {step + 1}: loss {loss.item():.3f}, " + monitor(model))
    model.eval()
    path = save_evaluator(model, processor, out)
    info = {"seed": seed, **meta, "heldout_combos_in_training": heldout,
            "train_seconds_this_run": round(time.time() - started, 1), "threads": threads}
    print(json.dumps(info))
    return path


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------

TARGET_ACCURACY = 0.95


def eval_scenes(n: int, split: str, seed: int = 1000) -> list[Scene]:
    """Fresh single-object scenes of a sampler split (the generator's pretraining distribution)."""
    rng = np.random.default_rng([seed, 2, ("train", "heldout").index(split)])
    return [sample_scene(rng, split, n_objects=1) for _ in range(n)]


def attribute_report(scorer, scenes: Sequence[Scene], images: Optional[Sequence] = None) -> dict[str, float]:
    """Zero-shot accuracy per attribute (shape, color, background, style) on single-object scenes,
    from their ``images`` (default: fresh renders)."""
    from cns.evaluation.metrics import attribute_accuracy

    emb = scorer.image_embeddings(images if images is not None else [render(s, IMAGE_SIZE) for s in scenes])
    report = {}
    for attribute in ATTRIBUTE_LABELS:
        labels, prompts = attribute_prompts(attribute)
        truth = [scene_attribute(s, attribute) for s in scenes]
        _, report[attribute] = attribute_accuracy(emb, labels, prompts, scorer, true_labels=truth)
    return report


def caption_report(scorer, n: int = 200, seed: int = 1000) -> dict[str, float]:
    """CLIP-T sanity check on fresh train-split scenes (1 or 2 objects): mean cosine of each image
    with its own caption and with the other captions, and caption retrieval top-1 accuracy."""
    import torch

    from cns.evaluation.metrics import cosine_matrix

    rng = np.random.default_rng([seed, 5])
    scenes = [sample_scene(rng, "train") for _ in range(n)]
    sims = cosine_matrix(scorer.image_embeddings([render(s, IMAGE_SIZE) for s in scenes]),
                         scorer.text_embeddings([caption(s) for s in scenes]))
    own = float(sims.diagonal().mean())
    other = float((sims.sum() - sims.diagonal().sum()) / (n * n - n))
    top1 = float((sims.argmax(dim=1) == torch.arange(n)).float().mean())
    return {"own": own, "other": other, "top1": top1}


def class_scenes(concept, n: int = 10, seed: int = 0, layouts: int = 5) -> list[Scene]:
    """Scenes laid out like the concept's examples but showing a plain member of its class.

    Scene k uses the example layout (size, position, context, object style) of index
    ``k % layouts``. Object / creature concepts: the personal subject is replaced by a
    base-world object of the same class (random color, at most one decoration, never a
    reserved look); style concepts use the base styles, scene concepts the base backgrounds;
    everything else (context objects, backgrounds, styles) is drawn as for the concept.
    """
    import zlib

    rng = np.random.default_rng([seed, zlib.crc32(concept.name.encode()), 3])
    out = []
    for k in range(n):
        if concept.subject is not None:
            while True:
                obj = sample_object(rng, "center", classes=[concept.class_word])
                if not uses_reserved_look(Scene((obj,))):
                    break
            plain = replace(concept, subject=replace(obj, personal=True, offset=(0.0, 0.0)))
        elif concept.style is not None:
            plain = replace(concept, style=None)
        else:
            plain = replace(concept, background=None)
        out.append(plain.example_scene(rng, k % layouts))
    return out


def concept_scores(scorer, concept, n_images: int = 5, n_class: int = 10, seed: int = 0) -> tuple[float, float]:
    """(self CLIP-I, class CLIP-I) of a concept, over pairs of *different* example layouts.

    Self: the concept's images against each other (i != j). Class: concept image i against
    plain-class images laid out as example j != i (`class_scenes`). Both averages run over
    the same layout pairs, so their difference measures the concept's identity only.
    """
    from cns.evaluation.metrics import cosine_matrix
    from cns.world.concepts import make_concept_images

    own = scorer.image_embeddings([im for im, _ in make_concept_images(concept, n_images, IMAGE_SIZE, seed)])
    plain = scorer.image_embeddings([render(s, IMAGE_SIZE) for s in class_scenes(concept, n_class, seed, n_images)])
    own_layout = np.arange(n_images)
    class_layout = np.arange(n_class) % n_images
    self_cos = cosine_matrix(own, own).numpy()
    class_cos = cosine_matrix(own, plain).numpy()
    self_i = float(self_cos[own_layout[:, None] != own_layout[None, :]].mean())
    class_i = float(class_cos[own_layout[:, None] != class_layout[None, :]].mean())
    return self_i, class_i


def concept_report(scorer, n_images: int = 5, n_class: int = 10, seed: int = 0) -> list[dict]:
    """Per concept: self CLIP-I and class CLIP-I (`concept_scores`) and their margin."""
    from cns.world.concepts import CONCEPTS

    rows = []
    for concept in CONCEPTS:
        self_i, class_i = concept_scores(scorer, concept, n_images, n_class, seed)
        rows.append({"concept": concept.name, "kind": concept.kind, "class": concept.class_word,
                     "self": self_i, "class_clip_i": class_i, "margin": self_i - class_i})
    return rows


def evaluate(model_path: str | Path = EVALUATOR_PATH, n: int = 400, seed: int = 1000, threads: int = 1,
             low_res_size: int = 32) -> dict:
    """Print and return the attribute accuracies (train / held-out split, at 64 px and at the
    generator's ``low_res_size`` px) and the concept CLIP-I table."""
    import torch
    from PIL import Image

    from cns.evaluation.metrics import ClipScorer

    torch.set_num_threads(threads)
    scorer = ClipScorer.from_pretrained(str(model_path), device="cpu")
    n_params = sum(p.numel() for p in scorer.model.parameters())
    size_mb = sum(f.stat().st_size for f in Path(model_path).iterdir() if f.is_file()) / 1e6
    print(f"evaluator: {model_path} ({n_params / 1e6:.2f} M parameters, {size_mb:.2f} MB on disk)")
    result: dict = {"attributes": {}, "concepts": []}
    print(f"\nzero-shot attribute accuracy on {n} fresh single-object renders per split "
          f"(target >= {TARGET_ACCURACY:.0%})")
    print(f"{'split':<9}" + "".join(f"{a:>12}" for a in ATTRIBUTE_LABELS))
    ok = True
    low_res = {}
    for split in ("train", "heldout"):
        scenes = eval_scenes(n, split, seed)
        renders = np.stack([np.asarray(render(s, IMAGE_SIZE)) for s in scenes])
        acc = attribute_report(scorer, scenes, [Image.fromarray(im) for im in renders])
        result["attributes"][split] = acc
        ok &= all(v >= TARGET_ACCURACY for v in acc.values())
        print(f"{split:<9}" + "".join(f"{acc[a]:>12.3f}" for a in ATTRIBUTE_LABELS))
        low_res[split] = attribute_report(scorer, scenes,
                                          [Image.fromarray(im) for im in at_resolution(renders, low_res_size)])
    print(f"the same renders at the generator's {low_res_size} px (downsampled, then resized back by the processor):")
    for split, acc in low_res.items():
        result["attributes"][f"{split}_{low_res_size}px"] = acc
        print(f"{split:<9}" + "".join(f"{acc[a]:>12.3f}" for a in ATTRIBUTE_LABELS))
    cap = caption_report(scorer, seed=seed)
    result["captions"] = cap
    print(f"\nCLIP-T sanity (200 fresh scenes, full captions): own caption {cap['own']:.3f}, other captions "
          f"{cap['other']:.3f}, caption retrieval top-1 {cap['top1']:.3f}")
    print("\nconcept CLIP-I (cosine, pairs of different example layouts): own images vs each other | "
          "vs plain-class images")
    print(f"{'concept':<16}{'kind':<10}{'class':<12}{'self':>8}{'class':>8}{'margin':>8}")
    for row in concept_report(scorer, seed=0):
        result["concepts"].append(row)
        ok &= row["margin"] > 0
        print(f"{row['concept']:<16}{row['kind']:<10}{row['class']:<12}"
              f"{row['self']:>8.3f}{row['class_clip_i']:>8.3f}{row['margin']:>8.3f}")
    margins = [r["margin"] for r in result["concepts"]]
    print(f"\nmean margin {np.mean(margins):.3f}, min margin {np.min(margins):.3f}; "
          f"{'all targets met' if ok else 'SOME TARGETS MISSED'}")
    result["ok"] = bool(ok)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train or evaluate the tiny world's CLIP evaluator.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train and save the evaluator")
    t.add_argument("--out", default=str(EVALUATOR_PATH))
    t.add_argument("--steps", type=int, default=6000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the ViT tower used 5e-4)")
    t.add_argument("--attribute-weight", type=float, default=1.0,
                   help="weight of the zero-shot attribute-prompt loss added to the caption InfoNCE")
    t.add_argument("--head-weight", type=float, default=1.0,
                   help="weight of the auxiliary attribute heads on the image embedding (training only)")
    t.add_argument("--pool-size", type=int, default=64000,
                   help="rendered training scenes (cached), split evenly over the pool versions")
    t.add_argument("--max-shift", type=int, default=4, help="random translation augmentation, pixels")
    t.add_argument("--pool-versions", default=",".join(map(str, POOL_VERSIONS)),
                   help="comma-separated training pool versions (1: base recipes only; 2: also unnamed "
                        "style/background recipes and recolored creature parts)")
    t.add_argument("--patch-size", type=int, default=EvaluatorConfig.patch_size,
                   help="ViT patch size in pixels of the 64 px input (--image-tower vit, a new model only)")
    t.add_argument("--image-tower", default=EvaluatorConfig.image_tower, choices=IMAGE_TOWERS,
                   help="vit: a CLIPModel; efficientnet: a VisionTextDualEncoderModel with an EfficientNet "
                        "tower (a new model only)")
    t.add_argument("--low-res-fraction", type=float, default=0.3,
                   help="share of each batch shown at --low-res-size px and back (the generator's resolution)")
    t.add_argument("--low-res-size", type=int, default=32)
    t.add_argument("--heads", default="full", choices=sorted(HEAD_SETS), help="auxiliary head set")
    t.add_argument("--init-from", default=None,
                   help="start from this saved evaluator (weights and tokenizer) instead of from scratch")
    t.add_argument("--legible-only", action="store_true",
                   help="train only on the pool's scenes whose render shows what the caption names (is_legible)")
    t.add_argument("--recipe-weight", type=float, default=0.0,
                   help="weight of the contrastive loss among images of one recipe (0: off)")
    t.add_argument("--recipe-factors", default="style",
                   help=f"what that loss keys images on, comma-separated, of {','.join(RECIPE_FACTORS)}")
    t.add_argument("--recipe-temperature", type=float, default=0.5)
    t.add_argument("--style-balance", type=float, default=0.0,
                   help="draw scenes with probability count(style key) ** -this (0: uniformly)")
    t.add_argument("--workers", type=int, default=1, help="rendering (and legibility-checking) processes")
    t.add_argument("--threads", type=int, default=1, help="torch threads")
    t.add_argument("--no-heldout", action="store_true",
                   help="keep the generator's held-out (class, color/background) pairs out of training")
    t.add_argument("--tokenizer", default=None,
                   help="use this saved tokenizer (e.g. the shipped evaluator folder, to reproduce it) "
                        "instead of building one")
    t.add_argument("--cache-dir", default=None, help="pool and checkpoint cache (default ~/.cache/cns/evaluator)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--eval-every", type=int, default=500, help="print zero-shot accuracy every N steps (0: never)")
    e = sub.add_parser("eval", help="print attribute accuracies and concept CLIP-I")
    e.add_argument("--model", default=str(EVALUATOR_PATH))
    e.add_argument("--n", type=int, default=400, help="single-object scenes per split")
    e.add_argument("--seed", type=int, default=1000)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args.out, args.steps, args.seed, args.batch_size, args.lr, args.attribute_weight, args.head_weight,
              pool_size=args.pool_size, max_shift=args.max_shift,
              pool_versions=tuple(int(v) for v in args.pool_versions.split(",")), head_set=args.heads,
              init_from=args.init_from, config=EvaluatorConfig(image_tower=args.image_tower, patch_size=args.patch_size),
              low_res_fraction=args.low_res_fraction, low_res_size=args.low_res_size,
              workers=args.workers, threads=args.threads, heldout=not args.no_heldout,
              cache_dir=args.cache_dir, progress=not args.no_progress,
              eval_every=args.eval_every, tokenizer_path=args.tokenizer, legible_only=args.legible_only,
              recipe_weight=args.recipe_weight, recipe_factors=tuple(args.recipe_factors.split(",")),
              recipe_temperature=args.recipe_temperature, style_balance=args.style_balance)
        return 0
    result = evaluate(args.model, args.n, args.seed, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
