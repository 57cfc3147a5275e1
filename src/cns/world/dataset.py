"""Pools of rendered tiny-world scenes for pretraining, and the captions a model learns from.

A pool is rendered once in chunks (cached as ``.npy``, so an interrupted build resumes) and
reused across epochs: rendering costs more than a training step.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np

from .render import POSITION_PHRASES, Scene, decoration_phrase, render, sample_scene

__all__ = ["CHUNK", "pool_scenes", "render_pool", "training_caption"]

CHUNK = 500


def pool_scenes(seed: int, chunk: int, split: str = "train") -> list[Scene]:
    """The scenes of one chunk of a pool: a pure function of (seed, chunk, split)."""
    rng = np.random.default_rng([seed, chunk, 0 if split == "train" else 1])
    return [sample_scene(rng, split) for _ in range(CHUNK)]


def _render_chunk(job: tuple[int, int, str, int, str]) -> str:
    seed, chunk, split, size, path = job
    images = np.stack([np.asarray(render(s, size)) for s in pool_scenes(seed, chunk, split)])
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, images)
    os.replace(tmp, path)
    return path


def render_pool(
    n: int, seed: int = 0, split: str = "train", size: int = 64, cache_dir: str | Path = ".", workers: int = 2,
    progress: bool = True,
) -> tuple[list[Scene], np.ndarray]:
    """``n`` scenes of ``split`` and their renders, uint8 ``(n, size, size, 3)``."""
    from tqdm.auto import tqdm

    chunks = -(-n // CHUNK)
    folder = Path(cache_dir) / f"pool-{split}-seed{seed}-{size}px"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, k, split, size, str(folder / f"chunk{k:04d}.npy")) for k in range(chunks)]
    todo = [j for j in jobs if not os.path.exists(j[4])]
    if todo:
        with mp.get_context("spawn").Pool(max(1, workers)) as pool:
            for _ in tqdm(pool.imap_unordered(_render_chunk, todo), total=len(todo), disable=not progress,
                          desc=f"rendering {n} scenes"):
                pass
    scenes = [s for k in range(chunks) for s in pool_scenes(seed, k, split)][:n]
    images = np.concatenate([np.load(j[4]) for j in jobs])[:n]
    return scenes, images


def training_caption(scene: Scene, rng: np.random.Generator, drop: float = 0.15) -> str:
    """The scene's caption with attributes left out at random (each with probability ``drop``):
    an object's color, size, decorations or position, the background word (``on a background``),
    the style word (``style``), or the whole background / style part. Short prompts then work,
    and the slots personal concepts fill (``on a <new1> background``) are ones the model knows."""

    def maybe(p: float = drop) -> bool:
        return bool(rng.random() < p)

    objects = []
    for obj in scene.objects:
        words = ["a"]
        if not maybe():
            words.append(obj.size)
        if not maybe():
            words.append(obj.color)
        words.append(obj.shape)
        if obj.decorations and not maybe():
            words.append("with " + " and ".join(decoration_phrase(d) for d in obj.decorations))
        if not maybe(drop / 2):
            words.append(POSITION_PHRASES[obj.position])
        if words[1][0] in "aeiou":
            words[0] = "an"
        objects.append(" ".join(words))
    parts = [" and ".join(objects)]
    background = scene.background if isinstance(scene.background, str) else None
    style = scene.style if isinstance(scene.style, str) else None
    if not maybe(drop / 2):
        parts.append(f"on a {background} background" if background and not maybe() else "on a background")
    if not maybe(drop / 2):
        parts.append(f"{style} style" if style and not maybe() else "style")
    return ", ".join(parts)
