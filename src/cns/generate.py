"""Generation helpers: seeded images from a pipeline, image grids, prompt token checks."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from PIL import Image

from .tokens import find_tokens

__all__ = ["generate_images", "image_grid", "unknown_tokens"]


def unknown_tokens(prompt: str, known: Iterable[str]) -> list[str]:
    """The ``<token>``s written in ``prompt`` that the library has not learned."""
    known = set(known)
    return [t for t in find_tokens(prompt) if t not in known]


def generate_images(
    pipe,
    prompt: str,
    n: int = 4,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 4,
) -> list[Image.Image]:
    """``n`` images for ``prompt``; image ``i`` comes from seed ``seed + i``, so a set is
    reproducible and independent of the batch size."""
    images: list[Image.Image] = []
    device = pipe.device
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        generators = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(count)]
        latents = _initial_latents(pipe, generators, height, width)
        result = pipe(
            [prompt] * count,
            negative_prompt=[negative_prompt] * count if negative_prompt else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            latents=latents.to(device, pipe.unet.dtype),
            output_type="pil",
        )
        images.extend(result.images)
    return images


def _initial_latents(pipe, generators, height, width) -> torch.Tensor:
    scale = getattr(pipe, "vae_scale_factor", 8)
    size = pipe.unet.config.sample_size * scale
    height, width = height or size, width or size
    shape = (pipe.unet.config.in_channels, height // scale, width // scale)
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def image_grid(images: Sequence[Image.Image], cols: int | None = None, pad: int = 2, background=(255, 255, 255)) -> Image.Image:
    """Images (same size) on a grid, ``cols`` wide (default: near square)."""
    if not images:
        raise ValueError("no images for a grid")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), background)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(image.convert("RGB").resize((w, h)), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
