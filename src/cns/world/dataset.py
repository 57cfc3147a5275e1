"""Pools of rendered tiny-world scenes for pretraining, and the captions a model learns from.

A pool is rendered once in chunks (cached as ``.npy``, so an interrupted build resumes) and
reused across epochs: rendering costs more than a training step.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .recipes import sample_novel_background, sample_novel_style
from .render import (POSITION_PHRASES, Scene, decoration_phrase, has_enough_contrast, is_held_out, is_legible, render,
                     sample_scene)

__all__ = ["CHUNK", "pool_scene", "pool_scenes", "render_chunks", "render_pool", "training_caption"]

CHUNK = 500


def pool_scene(rng: np.random.Generator, split: str = "train", novel_background: float = 0.0,
               novel_style: float = 0.0, legible: bool = True) -> Scene:
    """One pretraining scene: `sample_scene`, then with probability ``novel_background`` an unnamed
    background recipe and with probability ``novel_style`` an unnamed style recipe instead of the
    named ones (`cns.world.recipes`; captioned ``on a background`` / ``style``). They show the
    VAE and the UNet the appearance primitives personal concepts are made of (high-contrast
    patterns, halftone and crosshatch fills, double outlines) without a concept's own recipe.
    ``legible``: only scenes whose render shows what the caption names (`is_legible`); the
    shipped model's pool is ``legible=False`` (`TinyWorldConfig.legible`)."""
    while True:
        scene = sample_scene(rng, split, legible=legible)
        if novel_background and rng.random() < novel_background:
            scene = replace(scene, background=sample_novel_background(rng, avoid_concept_colours=True))
        if novel_style and rng.random() < novel_style:
            scene = replace(scene, style=sample_novel_style(rng))
        if split == "heldout" and not is_held_out(scene):
            continue  # the named background was what held it out
        if not has_enough_contrast(scene):
            continue
        if legible and not isinstance(scene.style, str) and not is_legible(scene):
            continue  # an unnamed style can hide the objects' colors
        return scene


def pool_scenes(seed: int, chunk: int, split: str = "train", novel_background: float = 0.0,
                novel_style: float = 0.0, legible: bool = True) -> list[Scene]:
    """The scenes of one chunk of a pool: a pure function of its arguments (`pool_scene`)."""
    rng = np.random.default_rng([seed, chunk, 0 if split == "train" else 1])
    return [pool_scene(rng, split, novel_background, novel_style, legible) for _ in range(CHUNK)]


def _render_chunk(job: tuple[Callable[[int], Sequence[Scene]], int, int, str]) -> str:
    chunk_scenes, chunk, size, path = job
    images = np.stack([np.asarray(render(s, size)) for s in chunk_scenes(chunk)])
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, images)
    os.replace(tmp, path)
    return path


def _one_thread() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def render_chunks(
    folder: str | Path, chunk_scenes: Callable[[int], Sequence[Scene]], n: int, size: int = 64,
    workers: int = 2, progress: bool = True, desc: str | None = None,
) -> tuple[list[Scene], np.ndarray]:
    """The first ``n`` scenes of chunks ``chunk_scenes(0), chunk_scenes(1), ...`` (``CHUNK`` each)
    and their renders, uint8 ``(n, size, size, 3)``; chunks already in ``folder`` are reused.

    ``chunk_scenes`` must be a pure, picklable function of the chunk index (such as a
    ``functools.partial`` of a module-level function): workers are spawned processes.
    """
    from tqdm.auto import tqdm

    chunks = -(-n // CHUNK)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(chunk_scenes, k, size, str(folder / f"chunk{k:04d}.npy")) for k in range(chunks)]
    todo = [j for j in jobs if not os.path.exists(j[3])]
    if todo:
        with mp.get_context("spawn").Pool(max(1, workers), initializer=_one_thread) as pool:
            for _ in tqdm(pool.imap_unordered(_render_chunk, todo), total=len(todo), disable=not progress,
                          desc=desc or f"rendering {n} scenes"):
                pass
    scenes = [s for k in range(chunks) for s in chunk_scenes(k)][:n]
    images = np.concatenate([np.load(j[3]) for j in jobs])[:n]
    return scenes, images


def render_pool(
    n: int, seed: int = 0, split: str = "train", size: int = 64, cache_dir: str | Path = ".", workers: int = 2,
    progress: bool = True, novel_background: float = 0.0, novel_style: float = 0.0, legible: bool = True,
) -> tuple[list[Scene], np.ndarray]:
    """``n`` scenes of ``split`` (the generator's pretraining sampler, `pool_scene`) and their renders."""
    name = f"pool-{split}-seed{seed}-{size}px"
    if novel_background or novel_style:
        name += f"-novel{novel_background:g}-{novel_style:g}"
    name += "-legible" if legible else ""
    chunk_scenes = partial(pool_scenes, seed, split=split, novel_background=novel_background, novel_style=novel_style,
                           legible=legible)
    return render_chunks(Path(cache_dir) / name, chunk_scenes, n, size, workers, progress)


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
