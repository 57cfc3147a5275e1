"""Concept images kept small in memory, warnings said once, caption files read strictly (issue 25)."""

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps, JpegImagePlugin

from cns import CNSError
from cns.captions import read_caption_file
from cns.images import load_image_folder
from cns.testing import write_dummy_images


def _large(path: Path, size=(4000, 3000), mode="RGB", **save) -> Path:
    """A solid image with a few shapes, saved at ``path``."""
    image = Image.new(mode, size, (30, 120, 200) if mode == "RGB" else (30, 120, 200, 255))
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.rectangle((width // 10, height // 10, width // 3, height // 2), fill=(250, 200, 0) + ((255,) if mode == "RGBA" else ()))
    draw.ellipse((width // 2, height // 3, width - width // 8, height - height // 8), fill=(200, 20, 20) + ((255,) if mode == "RGBA" else ()))
    if mode == "RGBA":
        draw.rectangle((0, 0, width // 20, height // 20), fill=(0, 0, 0, 0))
    image.save(path, **save)
    return path


def _caught(function, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = function(*args, **kwargs)
    return result, [str(w.message) for w in caught]


# ----------------------------------------------------------------------------- memory
def test_large_image_is_kept_reduced(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    path = _large(folder / "big.png")
    [kept] = load_image_folder(folder)
    assert kept.image.mode == "RGB" and kept.image.size == (1365, 1024)  # short side 1024, aspect kept
    assert kept.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # the file's, not the pixels'
    assert kept.image.getpixel((5, 5)) == (30, 120, 200)  # colours survive the shrinking
    assert kept.image.getpixel((1365 * 3 // 4, 1024 * 2 // 3)) == (200, 20, 20)
    [kept] = load_image_folder(folder, min_side=768)  # the cap is 2 * min_side when over 1024
    assert kept.image.size == (2048, 1536)
    [kept] = load_image_folder(folder, min_side=2000)
    assert kept.image.size == (4000, 3000)  # within the cap of 4000: as decoded


def test_large_transparent_png_is_reduced_over_white(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    _large(folder / "big.png", size=(3000, 4000), mode="RGBA")
    [kept] = load_image_folder(folder)
    assert kept.image.mode == "RGB" and kept.image.size == (1024, 1365)
    assert kept.image.getpixel((2, 2)) == (255, 255, 255)


def test_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    _large(folder / "big.jpg", size=(4000, 3000), quality=90, exif=exif.tobytes())
    drafts = []
    original = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):
        result = original(self, mode, size)
        drafts.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    [kept] = load_image_folder(folder)
    assert drafts == [(2000, 1500)]  # libjpeg decoded at 1/2 scale, not 4000 x 3000
    assert kept.image.size == (1024, 1365)  # exif orientation applied, short side 1024
    red = np.asarray(kept.image)[800:1000, 300:500].reshape(-1, 3).mean(axis=0)  # the ellipse, turned
    assert abs(red - (200, 20, 20)).max() < 8
    with Image.open(folder / "big.jpg") as image:  # full decode, turned, shrunk: about the same pixels
        reference = ImageOps.exif_transpose(image).convert("RGB").resize((1024, 1365), Image.LANCZOS)
    difference = np.abs(np.asarray(kept.image, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert difference.mean() < 2


def test_normal_size_images_are_unchanged_pixel_for_pixel(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a.png": (64, 48), "b.png": (1024, 2000), "c.png": (700, 1024)}  # short side <= 1024
    for name, (width, height) in sizes.items():
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(folder / name)
    Image.fromarray(rng.integers(0, 256, size=(30, 40), dtype=np.uint8), mode="L").save(folder / "d.png")
    Image.fromarray(rng.integers(0, 256, size=(300, 200, 3), dtype=np.uint8)).save(folder / "e.jpg", quality=85)
    loaded = load_image_folder(folder, min_side=16)
    assert [k.path.name for k in loaded] == ["a.png", "b.png", "c.png", "d.png", "e.jpg"]
    for kept in loaded:
        with Image.open(kept.path) as image:
            expected = image.convert("RGB")
        assert kept.image.mode == "RGB" and kept.image.size == expected.size
        assert np.array_equal(np.asarray(kept.image), np.asarray(expected)), kept.path.name


def test_each_image_file_is_read_once(tmp_path, monkeypatch):
    folder = write_dummy_images(tmp_path / "images", count=3)
    reads = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or original(self))
    opened = []
    original_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or original_open(fp, *a, **k))
    loaded = load_image_folder(folder)
    assert reads == ["00.png", "01.png", "02.png"]
    assert not any(isinstance(fp, (str, Path)) for fp in opened)  # decoded from the bytes read
    assert [k.sha256 for k in loaded] == [hashlib.sha256(original(folder / n)).hexdigest() for n in reads]


# ----------------------------------------------------------------------------- warnings
def test_many_tiny_images_give_two_warnings(tmp_path):
    folder = write_dummy_images(tmp_path / "tiny", count=25, size=8)
    images, messages = _caught(load_image_folder, folder, min_side=16)
    assert len(images) == 25
    assert len(messages) == 2, messages
    assert messages[0] == "25 of 25 images are smaller than the model's 16 px (first: 00.png, 8x8 px)"
    assert messages[1] == (f"{folder} holds 25 images; CNS learns a concept from a few (1-6 is typical); "
                           "all 25 are used")


def test_one_small_image_is_named_in_its_warning(tmp_path):
    folder = write_dummy_images(tmp_path / "images", count=3, size=32)
    Image.new("RGB", (8, 12)).save(folder / "01.png")
    _, messages = _caught(load_image_folder, folder, min_side=16)
    assert messages == ["01.png is 8x12 px, smaller than the model's 16 px"]


def test_class_image_folders_are_not_warned_about(tmp_path):
    """Without ``min_side`` (class images, evaluation folders) many images are expected."""
    folder = write_dummy_images(tmp_path / "class", count=25, size=8)
    images, messages = _caught(load_image_folder, folder)
    assert len(images) == 25 and messages == []


# ----------------------------------------------------------------------------- captions
def test_caption_file_not_utf8(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes(b"00.png\ta dog\n" + b"\xff\xfe\x00bad")
    with pytest.raises(CNSError, match="not UTF-8 text") as info:
        read_caption_file(path)
    message = str(info.value)
    assert str(path) in message and "offset 13" in message and "\n" not in message


def test_caption_file_with_a_bom_is_read(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes("\ufeff00.png\ta dog\n".encode("utf-8"))
    assert read_caption_file(path) == {"00.png": "a dog"}


@pytest.mark.parametrize("data, keywords", [
    (["a dog", "a cat"], ["JSON object", "not a list"]),
    ({"00.png": "a dog", "01.png": 3}, ["'01.png'", "not int"]),
    ({"00.png": None}, ["'00.png'", "not null"]),
    ({"00.png": ["a", "dog"]}, ["'00.png'", "not list"]),
], ids=["list", "number", "null", "nested-list"])
def test_caption_json_of_the_wrong_shape(tmp_path, data, keywords):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CNSError) as info:
        read_caption_file(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for word in keywords:
        assert word in message, message


def test_caption_line_without_a_file_name(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("00.png\ta dog\n\ta dog with no file\n")
    with pytest.raises(CNSError, match="no file name") as info:
        read_caption_file(path)
    assert f"{path}:2:" in str(info.value)


def test_caption_file_that_is_a_folder(tmp_path):
    path = tmp_path / "captions.json"
    path.mkdir()
    with pytest.raises(CNSError, match="is a folder") as info:
        read_caption_file(path)
    assert str(path) in str(info.value)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_caption_file_that_cannot_be_read(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("00.png\ta dog\n")
    path.chmod(0)
    try:
        with pytest.raises(CNSError, match="permission denied") as info:
            read_caption_file(path)
        assert str(path) in str(info.value)
    finally:
        path.chmod(0o644)


def test_caption_file_read_error_is_a_clear_error(tmp_path, monkeypatch):
    """The same refusal as above, where permissions are not enforced (root)."""
    path = tmp_path / "captions.txt"
    path.write_text("00.png\ta dog\n")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(CNSError, match="permission denied") as info:
        read_caption_file(path)
    assert str(path) in str(info.value)


def test_unreadable_image_is_a_clear_error(tmp_path, monkeypatch):
    folder = write_dummy_images(tmp_path / "images", count=2)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(CNSError, match="permission denied") as info:
        load_image_folder(folder)
    assert str(folder / "00.png") in str(info.value)


def test_missing_caption_file(tmp_path):
    with pytest.raises(CNSError, match="does not exist"):
        read_caption_file(tmp_path / "nope.json")
