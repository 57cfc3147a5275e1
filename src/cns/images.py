"""Reading a user's concept images: strict about what is an image, lenient about its mode."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import CNSError

__all__ = ["ConceptImage", "load_image_folder", "to_rgb", "image_tensor", "MAX_SIDE"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_SIDE = 8192  # larger images are refused: decoding them could exhaust memory


@dataclass
class ConceptImage:
    path: Path
    image: Image.Image  # RGB
    sha256: str


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: grayscale, 16-bit, palette, CMYK; transparency over white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _open_image(path: Path) -> Image.Image:
    if path.stat().st_size == 0:
        raise CNSError(f"{path} is an empty file, not an image")
    try:
        with Image.open(path) as probe:
            width, height = probe.size
            if max(width, height) > MAX_SIDE:
                raise CNSError(f"{path} is {width}x{height} px; images over {MAX_SIDE} px a side are refused")
            probe.verify()
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except CNSError:
        raise
    except Image.DecompressionBombError as exc:
        raise CNSError(f"{path} is too large to decode safely: {exc}") from None
    except Exception as exc:  # Pillow raises many types for damaged files
        raise CNSError(f"{path} is not a readable image ({type(exc).__name__}: {exc})") from None


def load_image_folder(folder: str | Path, min_side: int | None = None) -> list[ConceptImage]:
    """Every image of ``folder`` (sorted by name), as RGB, with the SHA-256 of its file.

    Refuses a missing or empty folder and any file that is not a readable image (hidden
    files are skipped). Warns about images smaller than ``min_side``.
    """
    folder = Path(folder)
    if not folder.exists():
        raise CNSError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise CNSError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [p for p in files if p.suffix.lower() not in {".json", ".txt", ".tsv", ".csv", ".md"}]
    if not files:
        raise CNSError(f"image folder {folder} holds no images")
    images = []
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise CNSError(f"{path} is not an image file (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})")
        image = _open_image(path)
        if min_side and min(image.size) < min_side:
            warnings.warn(f"{path.name} is {image.size[0]}x{image.size[1]} px, smaller than the model's {min_side} px")
        images.append(ConceptImage(path=path, image=image, sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    return images


def image_tensor(image: Image.Image, resolution: int, flip: bool = False) -> torch.Tensor:
    """Resize the short side to ``resolution`` (bicubic), centre-crop, scale to [-1, 1], CHW."""
    width, height = image.size
    scale = resolution / min(width, height)
    resized = image.resize((max(resolution, round(width * scale)), max(resolution, round(height * scale))), Image.BICUBIC)
    left = (resized.width - resolution) // 2
    top = (resized.height - resolution) // 2
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    if flip:
        cropped = cropped.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
