"""Evaluation metrics: CLIP-I, CLIP-T, zero-shot attribute classification and continual-learning
summaries (average score, forgetting, backward transfer).

Works with any transformers dual encoder that ``AutoModel`` loads and that has
``get_image_features`` / ``get_text_features``: a ``CLIPModel`` such as
``openai/clip-vit-base-patch32`` for Stable Diffusion, or a ``VisionTextDualEncoderModel`` such as
the tiny world's evaluator (``cns.world.evaluator.EVALUATOR_PATH``)::

    scorer = ClipScorer.from_pretrained("openai/clip-vit-base-patch32")
    settings = ClipSettings(scale=2.5, clip_at_zero=True, replace_tokens_with_class=True)
    gen, ref = scorer.image_embeddings(generated), scorer.image_embeddings(concept_images)
    clip_i(gen, ref, settings)
    clip_t(gen, scorer.text_embeddings([prepare_prompt(p, {"<new1>": "dog"}, settings)]), settings)

Field conventions differ (x2.5 scaling, clipping at 0, replacing the personal token by its
class word, a "A photo depicts " prefix); each is a `ClipSettings` field and
`ClipSettings.describe()` says which were used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "ClipScorer",
    "continual_or_nan",
    "ClipSettings",
    "clip_i",
    "clip_t",
    "multi_concept_clip_i",
    "prepare_prompt",
    "cosine_matrix",
    "attribute_accuracy",
    "zero_shot_predict",
    "average_score",
    "forgetting",
    "backward_transfer",
    "continual_summary",
]

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[Sequence[float]]]


# ---------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------


class ClipScorer:
    """L2-normalised CLIP image and text embeddings from a transformers dual encoder
    (``CLIPModel``, ``VisionTextDualEncoderModel``).

    Images go through the checkpoint's own processor (CLIP preprocessing: short side resized
    bicubic to the model's image size, centre crop, CLIP mean/std normalisation).
    """

    def __init__(self, model, processor, device: Union[str, torch.device, None] = None, batch_size: int = 64):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.float().to(self.device).eval()
        self.processor = processor
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, device: Union[str, torch.device, None] = None, batch_size: int = 64, **kwargs
    ) -> "ClipScorer":
        """Load a dual encoder (``AutoModel``) and its processor (``AutoProcessor``: image
        processor + tokenizer) from a folder or a hub id."""
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(str(name_or_path), **kwargs)
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise TypeError(f"{name_or_path}: {type(model).__name__} is not a dual image-text encoder "
                            "(no get_image_features / get_text_features)")
        processor = AutoProcessor.from_pretrained(str(name_or_path))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model, processor, device, batch_size)

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def _empty(self) -> torch.Tensor:
        return torch.zeros(0, self.dim)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence) -> torch.Tensor:
        """(N, D) normalised embeddings of PIL images (or arrays the processor accepts), on CPU."""
        images = [im.convert("RGB") if hasattr(im, "convert") else im for im in images]
        if not images:
            return self._empty()
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = self.processor(images=images[start : start + self.batch_size], return_tensors="pt")
            pixels = batch["pixel_values"].to(self.device, torch.float32)
            emb = projected_features(self.model.get_image_features(pixel_values=pixels))
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """(N, D) normalised embeddings of texts (truncated to the tokenizer's max length), on CPU."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            return self._empty()
        out = []
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        for start in range(0, len(texts), self.batch_size):
            batch = tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                              return_tensors="pt")
            emb = projected_features(self.model.get_text_features(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
            ))
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)


def projected_features(output) -> torch.Tensor:
    """The embedding in what ``get_image_features`` / ``get_text_features`` return: a tensor
    (transformers 4) or an output whose ``pooler_output`` holds it (transformers 5)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


# ---------------------------------------------------------------------------
# CLIP-I / CLIP-T
# ---------------------------------------------------------------------------


@dataclass
class ClipSettings:
    """Conventions of a CLIP score.

    scale: multiply cosines by this (1.0, or 2.5 as in CLIPScore); clip_at_zero: max(cos, 0)
    per pair before averaging (CLIPScore); replace_tokens_with_class: write the class word in
    place of each personal token in CLIP-T prompts (CLIP has never seen the token);
    text_prefix: prepended to CLIP-T prompts (e.g. "A photo depicts ").
    """

    scale: float = 1.0
    clip_at_zero: bool = False
    replace_tokens_with_class: bool = True
    text_prefix: str = ""

    def describe(self) -> str:
        return (
            f"scale x{self.scale:g}, clip at 0: {'yes' if self.clip_at_zero else 'no'}, "
            f"tokens -> class word: {'yes' if self.replace_tokens_with_class else 'no'}, "
            f"text prefix: {self.text_prefix!r}"
        )

    def apply(self, cosines: torch.Tensor) -> torch.Tensor:
        """Clip (if asked) then scale per-pair cosines."""
        if self.clip_at_zero:
            cosines = cosines.clamp(min=0.0)
        return cosines * self.scale


DEFAULT_SETTINGS = ClipSettings()


def _as_matrix(x: ArrayLike) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise ValueError(f"expected (N, D) embeddings, got shape {tuple(t.shape)}")
    return t


def cosine_matrix(a: ArrayLike, b: ArrayLike) -> torch.Tensor:
    """(Na, Nb) cosine similarities (inputs are normalised here, so raw features work too)."""
    a = torch.nn.functional.normalize(_as_matrix(a), dim=-1)
    b = torch.nn.functional.normalize(_as_matrix(b), dim=-1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]}")
    return a @ b.T


def clip_i(generated: ArrayLike, reference: ArrayLike, settings: ClipSettings = DEFAULT_SETTINGS,
           exclude_diagonal: bool = False) -> float:
    """CLIP-I: mean (scaled, optionally clipped) cosine over all (generated, reference) pairs.

    ``exclude_diagonal`` drops pairs (i, i), for a set compared with itself.
    """
    cos = settings.apply(cosine_matrix(generated, reference))
    if exclude_diagonal:
        if cos.shape[0] != cos.shape[1] or cos.shape[0] < 2:
            raise ValueError("exclude_diagonal needs two equally long sets of at least 2 embeddings")
        mask = ~torch.eye(cos.shape[0], dtype=torch.bool)
        return float(cos[mask].mean())
    return float(cos.mean())


def clip_t(images: ArrayLike, texts: ArrayLike, settings: ClipSettings = DEFAULT_SETTINGS) -> float:
    """CLIP-T: mean (scaled, optionally clipped) image-prompt cosine.

    One text embedding: every image against it. As many texts as images: image k against
    text k (each generated image with its own prompt).
    """
    img, txt = _as_matrix(images), _as_matrix(texts)
    cos = cosine_matrix(img, txt)
    if txt.shape[0] == 1:
        pairs = cos[:, 0]
    elif txt.shape[0] == img.shape[0]:
        pairs = cos.diagonal()
    else:
        raise ValueError(f"need 1 text or one per image, got {txt.shape[0]} texts for {img.shape[0]} images")
    return float(settings.apply(pairs).mean())


def multi_concept_clip_i(generated: ArrayLike, references: Sequence[ArrayLike],
                         settings: ClipSettings = DEFAULT_SETTINGS) -> float:
    """Multi-concept CLIP-I: mean over the prompt's concepts of CLIP-I against each concept's images."""
    if not references:
        raise ValueError("no reference sets")
    return float(np.mean([clip_i(generated, ref, settings) for ref in references]))


_TOKEN = re.compile(r"<[^<>\s]+>")


def prepare_prompt(prompt: str, token_to_class: Optional[Mapping[str, str]] = None,
                   settings: ClipSettings = DEFAULT_SETTINGS) -> str:
    """The text CLIP-T scores for a generation prompt.

    With ``settings.replace_tokens_with_class``, each personal token is replaced by its class
    word, without doubling it: 'a <new1> dog' -> 'a dog'; a token not followed by its class
    word becomes the class word ('<new1> style' with {'<new1>': 'style'} -> 'style').
    Tokens missing from ``token_to_class`` (of the form <...>) are dropped. Then
    ``settings.text_prefix`` is prepended.
    """
    text = prompt
    if settings.replace_tokens_with_class:
        mapping = dict(token_to_class or {})

        def repl_known(token: str, cls: str, s: str) -> str:
            s = re.sub(rf"{re.escape(token)}\s+(?={re.escape(cls)}\b)", "", s)
            return s.replace(token, cls)

        for token, cls in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
            text = repl_known(token, cls, text)
        text = _TOKEN.sub("", text)
        text = re.sub(r"\s+", " ", text).strip()
        text = re.sub(r"\s+,", ",", text)
    if settings.text_prefix:
        text = settings.text_prefix + text
    return text


# ---------------------------------------------------------------------------
# Zero-shot classification
# ---------------------------------------------------------------------------


def zero_shot_predict(image_embeddings: ArrayLike, prompt_embeddings: ArrayLike) -> np.ndarray:
    """Index of the most similar prompt for each image."""
    return cosine_matrix(image_embeddings, prompt_embeddings).argmax(dim=1).numpy()


def attribute_accuracy(
    image_embeddings: ArrayLike,
    labels: Sequence[str],
    prompts: Union[Sequence[str], ArrayLike],
    scorer: Optional[ClipScorer] = None,
    true_labels: Optional[Sequence[str]] = None,
):
    """Zero-shot classification of one attribute (shape, color, background, style ...).

    ``labels[k]`` is described by ``prompts[k]``: texts (embedded with ``scorer``) or already
    computed text embeddings. Returns the predicted labels (argmax cosine); with
    ``true_labels``, returns ``(predicted, accuracy)``.
    """
    if len(prompts) != len(labels):
        raise ValueError("one prompt per label")
    if len(prompts) and isinstance(prompts[0], str):
        if scorer is None:
            raise ValueError("text prompts need a scorer")
        text_emb = scorer.text_embeddings(list(prompts))
    else:
        text_emb = _as_matrix(prompts)
    predicted = [labels[k] for k in zero_shot_predict(image_embeddings, text_emb)]
    if true_labels is None:
        return predicted
    if len(true_labels) != len(predicted):
        raise ValueError("one true label per image")
    accuracy = float(np.mean([p == t for p, t in zip(predicted, true_labels)])) if predicted else float("nan")
    return predicted, accuracy


# ---------------------------------------------------------------------------
# Continual-learning summaries of a score matrix a[j, i] (concept i after task j)
# ---------------------------------------------------------------------------


def _score_matrix(a: ArrayLike) -> np.ndarray:
    m = np.asarray(a, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"expected a non-empty square T x T score matrix, got shape {m.shape}")
    t = m.shape[0]
    lower = np.tril(np.ones((t, t), dtype=bool))
    if np.isnan(m[lower]).any():
        raise ValueError("score matrix has NaN on or below the diagonal (a[j, i] with i <= j is needed)")
    return m


def average_score(a: ArrayLike) -> float:
    """A_T = mean_i a[T-1, i]: every concept's score after the last task."""
    m = _score_matrix(a)
    return float(m[-1].mean())


def forgetting(a: ArrayLike) -> float:
    """F_T = mean_{i < T-1} max_{l in [i, T-2]} (a[l, i] - a[T-1, i]); 0 for a single task."""
    m = _score_matrix(a)
    t = m.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([max(m[l, i] - m[t - 1, i] for l in range(i, t - 1)) for i in range(t - 1)]))


def backward_transfer(a: ArrayLike) -> float:
    """BWT = mean_{i < T-1} (a[T-1, i] - a[i, i]); 0 for a single task."""
    m = _score_matrix(a)
    t = m.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([m[t - 1, i] - m[i, i] for i in range(t - 1)]))


def continual_summary(a: ArrayLike) -> dict[str, float]:
    """{'average': A_T, 'forgetting': F_T, 'bwt': BWT}."""
    return {"average": average_score(a), "forgetting": forgetting(a), "bwt": backward_transfer(a)}


def continual_or_nan(matrix: np.ndarray) -> dict[str, float]:
    """A_T, F_T, BWT of a score matrix; F_T and BWT are NaN where the run scored only the first
    concept after each task (the long preset)."""
    if np.isnan(matrix[np.tril_indices(matrix.shape[0])]).any():
        return {"average": float(np.mean(matrix[-1])), "forgetting": float("nan"), "bwt": float("nan")}
    return continual_summary(matrix)
