"""Reading a user's concept images: strict about what is an image, lenient about its mode."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import CNSError
from .storage import read_file_bytes

__all__ = ["ConceptImage", "load_image_folder", "to_rgb", "image_tensor", "MAX_SIDE"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_SIDE = 8192  # larger images are refused: decoding them could exhaust memory
WORKING_SIDE = 1024  # kept images are shrunk to this short side (or 2 * min_side if larger)
MANY_IMAGES = 20  # more images than this in one folder is worth a warning
_REDUCIBLE_MODES = {"L", "LA", "RGB", "RGBA"}  # modes Image.reduce averages correctly


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


def _working_side(min_side: int | None) -> int:
    """The short side a kept image is shrunk to when it is larger."""
    return max(2 * min_side, WORKING_SIDE) if min_side else WORKING_SIDE


def _fit(size: tuple[int, int], short: int) -> tuple[int, int]:
    """``size`` scaled so that its short side is ``short``, aspect ratio kept."""
    width, height = size
    scale = short / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _open_image(path: Path, data: bytes, cap: int) -> Image.Image:
    """``data`` (the bytes of ``path``) decoded as RGB, its short side shrunk to ``cap`` when longer.

    Images over MAX_SIDE px are refused before decoding; JPEGs are decoded at a reduced scale
    (``draft``) where that still leaves the short side at least ``cap``.
    """
    if not data:
        raise CNSError(f"{path} is an empty file, not an image")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if max(width, height) > MAX_SIDE:
                raise CNSError(f"{path} is {width}x{height} px; images over {MAX_SIDE} px a side are refused")
            probe.verify()
        with Image.open(io.BytesIO(data)) as image:
            if min(image.size) <= cap:
                image.load()
                return to_rgb(image)
            if image.format == "JPEG":
                image.draft(None, _fit(image.size, cap))
            image.load()
            reduced = image
            factor = min(reduced.size) // cap
            if factor >= 2 and reduced.mode in _REDUCIBLE_MODES:
                reduced = reduced.reduce(factor)  # before to_rgb, so no full-size copies are made
            rgb = to_rgb(reduced)
            del reduced
        if min(rgb.size) > cap:
            rgb = rgb.resize(_fit(rgb.size, cap), Image.LANCZOS, reducing_gap=3.0)
        return rgb
    except CNSError:
        raise
    except Image.DecompressionBombError as exc:
        raise CNSError(f"{path} is too large to decode safely: {exc}") from None
    except Exception as exc:  # Pillow raises many types for damaged files
        raise CNSError(f"{path} is not a readable image ({type(exc).__name__}: {exc})") from None


# files an image folder may hold beside the images: captions (kohya's .txt / .caption sidecars,
# captions.json), notes
NOT_IMAGES = {".json", ".txt", ".caption", ".tsv", ".csv", ".md"}


def load_image_folder(folder: str | Path, min_side: int | None = None) -> list[ConceptImage]:
    """Every image of ``folder`` (sorted by name), as RGB, with the SHA-256 of its file.

    Refuses a missing or empty folder and any file that is not a readable image (hidden
    files are skipped). Images whose short side is over ``max(2 * min_side, 1024)`` px
    (1024 without ``min_side``) are kept shrunk to it. Warns once if any image is smaller
    than ``min_side``, and (with ``min_side``, i.e. for a concept's own images) once if the
    folder holds more than MANY_IMAGES images.
    """
    folder = Path(folder)
    if not folder.exists():
        raise CNSError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise CNSError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [p for p in files if p.suffix.lower() not in NOT_IMAGES]
    if not files:
        raise CNSError(f"image folder {folder} holds no images")
    cap = _working_side(min_side)
    images = []
    small = []  # (name, size) of images smaller than min_side
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise CNSError(f"{path} is not an image file (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})")
        data = read_file_bytes(path)
        image = _open_image(path, data, cap)
        if min_side and min(image.size) < min_side:
            small.append((path.name, image.size))
        images.append(ConceptImage(path=path, image=image, sha256=hashlib.sha256(data).hexdigest()))
        del data
    if len(small) == 1:
        name, (width, height) = small[0]
        warnings.warn(f"{name} is {width}x{height} px, smaller than the model's {min_side} px")
    elif small:
        name, (width, height) = small[0]
        warnings.warn(f"{len(small)} of {len(images)} images are smaller than the model's {min_side} px "
                      f"(first: {name}, {width}x{height} px)")
    if min_side and len(images) > MANY_IMAGES:  # min_side marks a concept's own images
        warnings.warn(f"{folder} holds {len(images)} images; CNS learns a concept from a few "
                      f"(1-6 is typical); all {len(images)} are used")
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
