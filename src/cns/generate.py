"""Generation helpers: seeded images from a pipeline, image grids, prompt token checks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image

from . import __version__
from .errors import CNSError
from .tokens import find_tokens, normalize_token

__all__ = ["generate_images", "generate_many", "image_grid", "unknown_tokens", "check_output_files", "save_images", "made_by_cns"]

PNG_KEY = "cns"  # the PNG text chunk that marks an image cns wrote


def unknown_tokens(prompt: str, known: Iterable[str], tokenizer=None) -> list[str]:
    """The ``<token>``s written in ``prompt`` that the library has not learned (compared in the
    form ``tokenizer`` normalizes them to, when given)."""
    def norm(token: str) -> str:
        return normalize_token(token, tokenizer) if tokenizer is not None else token

    known = {norm(t) for t in known}
    return [t for t in find_tokens(prompt) if norm(t) not in known]


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
    return generate_many(pipe, [(prompt, seed + i) for i in range(n)], steps=steps, guidance=guidance, height=height,
                         width=width, negative_prompt=negative_prompt, batch_size=batch_size)


def generate_many(
    pipe,
    requests: Sequence[tuple[str, int]],
    steps: int = 50,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 4,
) -> list[Image.Image]:
    """One image per ``(prompt, seed)`` request, in order, drawn ``batch_size`` at a time
    whatever their prompts. Each image starts from its own seed's noise, so it is the same
    image in any batch (to float tolerance)."""
    images: list[Image.Image] = []
    device = pipe.device
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in chunk]
        latents = _initial_latents(pipe, generators, height, width)
        result = pipe(
            [prompt for prompt, _ in chunk],
            negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
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


def made_by_cns(path: Path) -> bool:
    """Whether the PNG at ``path`` carries the text chunk :func:`save_images` writes."""
    try:
        with Image.open(path) as image:
            return PNG_KEY in getattr(image, "text", {})
    except Exception:  # not an image, or unreadable: not ours
        return False


def check_output_files(out: Path, names: Sequence[str], overwrite: bool = False) -> None:
    """Refuse, before anything is drawn, an ``out`` that is a file, and any of ``names`` that
    exists in it, unless ``overwrite`` and cns wrote it (a user's file is never replaced)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CNSError(f"--out {out} is a file; give a folder for the images")
    for name in names:
        path = out / name
        if not path.exists() and not path.is_symlink():
            continue
        if not overwrite:
            raise CNSError(f"{path} already exists; choose another --out, or pass --force to replace the images an "
                           "earlier `cns generate` wrote there")
        if path.is_symlink() or not path.is_file() or not made_by_cns(path):
            raise CNSError(f"{path} was not written by cns generate; it is never replaced: choose another --out")


def save_images(out: Path, images: dict[str, Image.Image], parameters: dict, seed: int, overwrite: bool = False) -> None:
    """Write ``{name: image}`` into ``out`` as PNGs that say how they were made (A1111's
    ``parameters`` text, read by image viewers and web UIs, and cns's own chunk). Each file is
    written beside its name, then renamed into place; see :func:`check_output_files`."""
    from PIL import PngImagePlugin

    out = Path(out)
    check_output_files(out, list(images), overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for offset, (name, image) in enumerate(images.items()):
        info = PngImagePlugin.PngInfo()
        lines = [parameters.get("prompt") or ""]
        if parameters.get("negative_prompt"):
            lines.append(f"Negative prompt: {parameters['negative_prompt']}")
        image_seed = seed + offset if name != "grid.png" else seed
        lines.append(f"Steps: {parameters.get('steps')}, CFG scale: {parameters.get('guidance')}, Seed: {image_seed}, "
                     f"Size: {image.width}x{image.height}")
        info.add_text("parameters", "\n".join(lines))
        info.add_text(PNG_KEY, json.dumps(dict(parameters, seed=image_seed, made_by=f"cns {__version__}")))
        tmp = out / f".{name}.{os.getpid()}.tmp"
        try:
            image.save(tmp, format="PNG", pnginfo=info)
            os.replace(tmp, out / name)
        finally:
            tmp.unlink(missing_ok=True)
