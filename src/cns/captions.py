"""Where the captions of a concept's images come from (they feed neuron selection, Eq. 4):
a user file, a template, or an image-to-text model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Protocol, Sequence

from PIL import Image

from .errors import CNSError
from .storage import read_text_file

__all__ = [
    "DEFAULT_CAPTION_TEMPLATE",
    "Captioner",
    "TemplateCaptioner",
    "TransformersCaptioner",
    "read_caption_file",
    "captions_for_images",
    "insert_token",
]

DEFAULT_CAPTION_TEMPLATE = "a photo of a {class_word}"


class Captioner(Protocol):
    """Anything that writes one caption per image."""

    def __call__(self, images: Sequence[Image.Image], class_word: str) -> list[str]: ...


class TemplateCaptioner:
    """The same caption for every image, from a template with ``{class_word}``."""

    def __init__(self, template: str = DEFAULT_CAPTION_TEMPLATE):
        if "{class_word}" not in template:
            raise CNSError("a caption template must contain {class_word}")
        self.template = template

    def __call__(self, images: Sequence[Image.Image], class_word: str) -> list[str]:
        return [self.template.format(class_word=class_word)] * len(images)


class TransformersCaptioner:
    """Captions from a transformers image-to-text model (a local folder or a hub id), e.g. BLIP.

    The model loads lazily on first use; generation is greedy, so captions are deterministic.
    """

    def __init__(self, model: str, max_new_tokens: int = 30, device: str | None = None):
        self.model_name = model
        self.max_new_tokens = max_new_tokens
        self.device = device
        self._model = None
        self._processor = None

    def _load(self):
        import transformers
        from transformers import AutoProcessor

        # transformers 5 names the class AutoModelForImageTextToText; 4.x also had Vision2Seq
        auto = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        try:
            self._processor = AutoProcessor.from_pretrained(self.model_name)
            self._model = auto.from_pretrained(self.model_name).eval()
        except (OSError, ValueError) as exc:
            raise CNSError(f"cannot load captioning model {self.model_name!r}: {exc}".splitlines()[0]) from None
        if self.device:
            self._model.to(self.device)

    def __call__(self, images: Sequence[Image.Image], class_word: str) -> list[str]:
        import torch

        if self._model is None:
            self._load()
        captions = []
        with torch.no_grad():
            for image in images:
                inputs = self._processor(images=image, return_tensors="pt").to(self._model.device)
                ids = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
                captions.append(self._processor.batch_decode(ids, skip_special_tokens=True)[0].strip())
        return captions


def read_caption_file(path: str | Path) -> dict[str, str]:
    """A UTF-8 caption file: JSON ``{"file name": "caption"}``, or text lines ``file name<TAB>caption``
    (``file name: caption`` also works). Blank lines and ``#`` comments are skipped."""
    path = Path(path)
    text = read_text_file(path, "caption file")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CNSError(f"caption file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CNSError(f"caption file {path} must be a JSON object mapping file names to captions, "
                           f"not a {type(data).__name__}")
        for key, value in data.items():
            if not isinstance(value, str):
                kind = "null" if value is None else type(value).__name__
                raise CNSError(f"caption file {path}: the caption of {key!r} must be a string, not {kind}")
        return {str(k): v.strip() for k, v in data.items()}
    captions = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        sep = "\t" if "\t" in line else ":" if ":" in line else None
        if sep is None:
            raise CNSError(f"{path}:{number}: expected 'file name<TAB>caption'")
        name, caption = line.split(sep, 1)
        if not name.strip():
            raise CNSError(f"{path}:{number}: no file name before the caption")
        captions[name.strip()] = caption.strip()
    return captions


FOLDER_CAPTION_FILE = "captions.json"
SIDECAR_SUFFIXES = (".txt", ".caption")


def folder_caption_file(folder: str | Path, image_names: Sequence[str]) -> tuple[dict[str, str] | None, str]:
    """Captions that sit beside the images, as trainers lay them out: ``captions.json`` in the
    folder (``{"file name": "caption"}``, the tiny world's and cns's own layout), else one
    kohya-style sidecar per image (``01.png`` -> ``01.txt`` or ``01.caption``). Returns
    ``(table or None, where)``; sidecars for only some images are not used (a warning says so)."""
    folder = Path(folder)
    if (folder / FOLDER_CAPTION_FILE).is_file():
        return read_caption_file(folder / FOLDER_CAPTION_FILE), str(folder / FOLDER_CAPTION_FILE)
    table = {}
    for name in image_names:
        for suffix in SIDECAR_SUFFIXES:
            sidecar = folder / (Path(name).stem + suffix)
            if sidecar.is_file():
                table[name] = read_text_file(sidecar, "caption file").strip()
                break
    if table and len(table) < len(image_names):
        missing = [n for n in image_names if n not in table]
        warnings.warn(f"caption files beside {len(table)} of {len(image_names)} images in {folder} (none for "
                      f"{', '.join(missing[:3])}): they are not used; every image needs one")
        return None, ""
    return (table, f"{len(table)} caption files in {folder}") if table else (None, "")


def captions_for_images(
    image_names: Sequence[str],
    class_word: str,
    caption_file: str | Path | None = None,
    captioner: Captioner | None = None,
    images: Sequence[Image.Image] | None = None,
) -> list[str]:
    """One caption per image: from ``caption_file`` (matched by file name, with or without its
    extension), else from ``captioner``, else the default template."""
    if caption_file is not None:
        return captions_from_table(read_caption_file(caption_file), image_names)
    if captioner is not None:
        if images is None:
            raise ValueError("a captioner needs the images")
        return list(captioner(images, class_word))
    return TemplateCaptioner()(list(image_names), class_word)


def captions_from_table(table: dict[str, str], image_names: Sequence[str], where: str = "caption file") -> list[str]:
    """One caption per image from a ``{file name: caption}`` table (names with or without their
    extension); every image needs one, every entry names an image, none is empty."""
    stems = {Path(k).stem: v for k, v in table.items()}
    missing = [n for n in image_names if n not in table and Path(n).stem not in stems]
    if missing:
        raise CNSError(f"{where} has no caption for {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    known = set(image_names) | {Path(n).stem for n in image_names}
    extra = [k for k in table if k not in known and Path(k).stem not in known]
    if extra:
        raise CNSError(f"{where} names images that are not in the folder: {', '.join(extra[:3])}")
    captions = [table.get(n, stems.get(Path(n).stem, "")) for n in image_names]
    empty = [n for n, c in zip(image_names, captions) if not c]
    if empty:
        raise CNSError(f"{where}: the caption for {empty[0]} is empty")
    return captions


def insert_token(caption: str, token: str, class_word: str) -> str:
    """The training prompt for a caption: the token put before the first class word
    (``a big star on the left`` -> ``a big <new1> star on the left``); when the caption lacks
    the class word, ``photo of a {token} {class_word}, {caption}``."""
    words = caption.split(" ")
    for i, word in enumerate(words):
        if word.strip(",.;:!?").lower() == class_word.lower():
            return " ".join(words[:i] + [token] + words[i:])
    return f"photo of a {token} {class_word}, {caption}"
