"""Bad input through the CLI: every case exits non-zero with exactly one ``error:`` line on
stderr that names the problem, never a traceback, and leaves the library byte-for-byte as it was.
Also the lenient side: images in unusual modes are converted and learned."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cns import ConceptLibrary, ConceptSpec
from cns.cli import main
from cns.images import load_image_folder
from cns.storage import exclusive_lock
from cns.testing import make_dummy_pipeline, write_dummy_images

FAST_ARGS = ["--steps", "2", "--num-class-images", "2", "--class-image-steps", "2", "--quiet"]


# ----------------------------------------------------------------------------- helpers
def snapshot(folder: Path) -> dict:
    """Every file (with its bytes) and folder under ``folder``; the lock file is ignored."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    state = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel == ".lock":
            continue
        state[rel] = path.read_bytes() if path.is_file() else None
    return state


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_refused(capsys, args, keywords, library: Path | None = None) -> str:
    """``cns ARGS`` fails cleanly: non-zero, one ``error:`` line naming ``keywords``, no
    traceback, ``library`` unchanged. Returns the error line."""
    before = snapshot(library) if library is not None else None
    rc, out, err = run(capsys, *args)
    assert rc != 0
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    for word in keywords:
        assert str(word).lower() in line.lower(), f"{word!r} not in {line!r}"
    if library is not None:
        assert snapshot(library) == before, "the library changed"
    return line


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base_with_added_token(tmp_path_factory):
    """A base model whose tokenizer already holds the added token <new1> (as an exported
    cns pipeline does)."""
    path = tmp_path_factory.mktemp("added") / "base"
    pipe = make_dummy_pipeline(seed=1)
    pipe.tokenizer.add_tokens(["<new1>"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _folder_with(tmp_path: Path, name: str, data: bytes | None) -> Path:
    folder = write_dummy_images(tmp_path / "images", count=2)
    if data is not None:
        (folder / name).write_bytes(data)
    return folder


def _truncated_png(tmp_path: Path) -> bytes:
    source = write_dummy_images(tmp_path / "source", count=1, size=64)
    data = (source / "00.png").read_bytes()
    return data[: len(data) // 2]


# ----------------------------------------------------------------------------- image folders
def test_missing_image_folder(capsys, lib, tmp_path):
    missing = tmp_path / "no-such-folder"
    assert_refused(capsys, ["learn", lib, "--images", missing, "--class-word", "cat", *FAST_ARGS],
                   ["image folder", str(missing), "does not exist"], lib)


def test_empty_image_folder(capsys, lib, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"hidden files are skipped")
    assert_refused(capsys, ["learn", lib, "--images", empty, "--class-word", "cat", *FAST_ARGS],
                   [str(empty), "holds no images"], lib)


@pytest.mark.parametrize(
    "name, data, keywords",
    [
        ("03.png", b"just some text, saved as a .png\n", ["03.png", "not a readable image"]),
        ("02.png", b"", ["02.png", "empty file"]),
        ("notes.docx", b"PK\x03\x04 a word document", ["notes.docx", "not an image file"]),
    ],
    ids=["text-named-png", "zero-bytes", "docx"],
)
def test_bad_file_in_image_folder(capsys, lib, tmp_path, name, data, keywords):
    folder = _folder_with(tmp_path, name, data)
    assert_refused(capsys, ["learn", lib, "--images", folder, "--class-word", "cat", *FAST_ARGS], keywords, lib)


def test_truncated_png(capsys, lib, tmp_path):
    folder = _folder_with(tmp_path, "05.png", _truncated_png(tmp_path))
    assert_refused(capsys, ["learn", lib, "--images", folder, "--class-word", "cat", *FAST_ARGS],
                   ["05.png", "not a readable image"], lib)


def test_unusual_image_modes_are_converted_and_learned(capsys, lib, tmp_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8))
    rgb.convert("L").save(folder / "gray.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((24, 24), 0, dtype=np.uint8)))  # fully transparent
    rgba.save(folder / "alpha.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(np.full((24, 24), 65535, dtype=np.uint16)).save(folder / "deep16.png")
    rgb.convert("CMYK").save(folder / "print.jpg")
    modes = {p.name: Image.open(p).mode for p in folder.iterdir()}
    assert modes == {"gray.png": "L", "alpha.png": "RGBA", "palette.png": "P", "deep16.png": "I;16",
                     "print.jpg": "CMYK"}

    loaded = {img.path.name: img.image for img in load_image_folder(folder)}
    assert all(image.mode == "RGB" and image.size == (24, 24) for image in loaded.values())
    assert np.asarray(loaded["alpha.png"]).min() == 255  # transparency over white
    assert np.asarray(loaded["deep16.png"]).min() == 255  # 16-bit full scale is white, not clipped garbage

    rc, out, err = run(capsys, "learn", lib, "--images", folder, "--class-word", "cat", *FAST_ARGS)
    assert rc == 0, err
    assert err == "" and out.startswith("learned <new2> (cat)")
    record = ConceptLibrary(lib).concepts[-1]
    assert sorted(i["file"] for i in record["images"]) == sorted(modes)


# ----------------------------------------------------------------------------- tokens
def test_token_already_used_by_the_library(capsys, lib, concept_folders):
    # class "cat" has no cached class images yet: the refusal must come before generating any
    assert not (lib / "class_images" / "photo-of-a-cat").exists()
    assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "cat", "--token", "<new1>",
                            *FAST_ARGS], ["<new1>", "already used"], lib)


def test_token_already_in_the_vocabulary(capsys, lib, concept_folders):
    assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "cat",
                            "--token", "<|endoftext|>", *FAST_ARGS], ["<|endoftext|>", "vocabulary"], lib)


def test_token_added_to_the_base_tokenizer(capsys, tmp_path, base_with_added_token, concept_folders):
    library = tmp_path / "lib"
    assert run(capsys, "init", library, "--model", base_with_added_token)[0] == 0
    assert_refused(capsys, ["learn", library, "--images", concept_folders[1], "--class-word", "cat",
                            "--token", "<new1>", *FAST_ARGS], ["<new1>", "vocabulary"], library)
    # the default token skips what the vocabulary holds
    rc, out, err = run(capsys, "learn", library, "--images", concept_folders[1], "--class-word", "cat", *FAST_ARGS)
    assert rc == 0, err
    assert out.startswith("learned <new2> (cat)")


@pytest.mark.parametrize("token", ["new1", "<my dog>", "<a><b>"])
def test_malformed_token(capsys, lib, concept_folders, token):
    assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "cat", "--token", token,
                            *FAST_ARGS], [repr(token), "must look like <name>"], lib)


# ----------------------------------------------------------------------------- captions
def test_captions_file_missing_an_image(capsys, lib, tmp_path, concept_folders):
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"00.png": "a dog on grass", "01.png": "a dog on a sofa"}))
    assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "dog",
                            "--captions", captions, *FAST_ARGS], ["no caption for", "02.png"], lib)


def test_captions_file_naming_an_extra_image(capsys, lib, tmp_path, concept_folders):
    captions = tmp_path / "captions.txt"
    captions.write_text("00.png\ta dog\n01.png\ta dog\n02.png\ta dog\nghost.png\ta dog that is not there\n")
    assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "dog",
                            "--captions", captions, *FAST_ARGS], ["not in the folder", "ghost.png"], lib)


# ----------------------------------------------------------------------------- init
def test_init_with_missing_model_folder(capsys, tmp_path):
    target = tmp_path / "lib"
    missing = tmp_path / "no-model-here"
    assert_refused(capsys, ["init", target, "--model", missing], ["cannot load base model", str(missing)])
    assert not target.exists()


def test_init_with_folder_that_is_not_a_pipeline(capsys, tmp_path):
    target = tmp_path / "lib"
    folder = tmp_path / "just-a-folder"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 16)
    assert_refused(capsys, ["init", target, "--model", folder], [str(folder), "model_index.json"])
    assert not target.exists()


def test_init_with_unknown_hub_id_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = tmp_path / "lib"
    assert_refused(capsys, ["init", target, "--model", "nobody/does-not-exist"],
                   ["cannot load base model", "nobody/does-not-exist"])
    assert not target.exists()


def test_init_on_an_existing_library(capsys, lib, base_model):
    assert_refused(capsys, ["init", lib, "--model", base_model], [str(lib), "already holds a concept library"], lib)


def test_init_on_a_non_empty_folder(capsys, tmp_path, base_model):
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"not mine to touch")
    assert_refused(capsys, ["init", folder, "--model", base_model], [str(folder), "not an empty folder"], folder)


# ----------------------------------------------------------------------------- learn arguments
def test_learn_without_images_or_concepts_list(capsys, lib):
    assert_refused(capsys, ["learn", lib, *FAST_ARGS], ["--images", "--concepts-list"], lib)
    assert_refused(capsys, ["learn", lib, "--class-word", "cat", *FAST_ARGS], ["--images"], lib)


def test_learn_on_a_folder_that_is_not_a_library(capsys, tmp_path, concept_folders):
    assert_refused(capsys, ["learn", tmp_path, "--images", concept_folders[0], "--class-word", "dog", *FAST_ARGS],
                   ["not a concept library", "cns init"])


def test_concepts_list_with_missing_folder(capsys, lib, tmp_path, concept_folders):
    listing = tmp_path / "list" / "concepts.json"
    listing.parent.mkdir()
    listing.write_text(json.dumps([
        {"instance_prompt": "photo of a <new5> cat", "class_prompt": "cat", "instance_data_dir": str(concept_folders[1])},
        {"instance_prompt": "photo of a <new6> hat", "class_prompt": "hat", "instance_data_dir": "gone/hat"},
    ]))
    assert_refused(capsys, ["learn", lib, "--concepts-list", listing, *FAST_ARGS],
                   [str(tmp_path / "list" / "gone" / "hat"), "does not exist"], lib)


def test_concepts_list_entry_without_token(capsys, lib, tmp_path, concept_folders):
    listing = tmp_path / "concepts.json"
    listing.write_text(json.dumps([{"instance_prompt": "photo of a cat", "instance_data_dir": str(concept_folders[1])}]))
    assert_refused(capsys, ["learn", lib, "--concepts-list", listing, *FAST_ARGS], ["exactly one <token>"], lib)


def test_concepts_list_with_images_too(capsys, lib, tmp_path, concept_folders):
    listing = tmp_path / "concepts.json"
    listing.write_text("[]")
    assert_refused(capsys, ["learn", lib, "--concepts-list", listing, "--images", concept_folders[1], *FAST_ARGS],
                   ["either --concepts-list or --images"], lib)


# ----------------------------------------------------------------------------- generate
def test_generate_with_unknown_token_warns_once(capsys, lib, tmp_path):
    before = snapshot(lib)
    out_dir = tmp_path / "images"
    rc, out, err = run(capsys, "generate", lib, "a <new1> <zebra9>", "-n", 1, "--steps", 1,
                       "--out", out_dir)
    assert rc == 0, err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: "), err
    assert "<zebra9>" in lines[0] and "not learned" in lines[0]
    assert sorted(p.name for p in out_dir.iterdir()) == ["00000.png", "grid.png"]
    assert snapshot(lib) == before


@pytest.mark.parametrize("args, keywords", [
    (["-n", "0", "--steps", "1"], ["-n >= 1", "-n 0"]),
    (["-n", "1", "--steps", "0"], ["--steps >= 1", "--steps 0"]),
], ids=["no-images", "no-steps"])
def test_generate_with_nothing_to_do(capsys, lib, tmp_path, args, keywords):
    out_dir = tmp_path / "images"
    assert_refused(capsys, ["generate", lib, "a <new1> dog", *args, "--out", out_dir], keywords, lib)
    assert not out_dir.exists()


@pytest.mark.parametrize("args, keywords", [
    (["--steps", "-1"], ["--steps must be >= 1", "got -1"]),
    (["--steps", "0"], ["--steps must be >= 1", "got 0"]),
    (["--batch-size", "0"], ["--batch-size must be >= 1"]),
    (["--select-ratio", "1.5"], ["select ratio", "1.5"]),
    (["--resolution", "0"], ["resolution", "got 0"]),
    (["--resolution", "-16"], ["resolution", "got -16"]),
    (["--checkpoint-every", "-1"], ["checkpoint every", "got -1"]),
    (["--lambda-keep", "-2"], ["--lambda-keep", "got -2"]),
    (["--lr-neurons", "nan"], ["--lr-neurons", "finite", "got nan"]),
    (["--lr-embedding", "inf"], ["--lr-embedding", "finite", "got inf"]),
    (["--lr-neurons", "0"], ["--lr-neurons", "> 0"]),
    (["--prior-loss-weight", "-1"], ["--prior-loss-weight", ">= 0"]),
    (["--class-image-steps", "0"], ["--class-image-steps must be >= 1"]),
], ids=["steps-negative", "steps-zero", "batch-size", "select-ratio", "resolution-0", "resolution-negative", "checkpoint-every",
        "lambda-keep", "lr-nan", "lr-inf", "lr-zero", "prior-weight", "class-image-steps"])
def test_learn_with_bad_settings(capsys, lib, concept_folders, args, keywords):
    assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "cat", "--quiet", *args],
                   keywords, lib)


# ----------------------------------------------------------------------------- library state
def test_library_from_a_newer_format(capsys, lib, tmp_path, concept_folders):
    manifest = lib / "library.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 99
    manifest.write_text(json.dumps(data, indent=2))
    for args in (["show", lib],
                 ["learn", lib, "--images", concept_folders[1], "--class-word", "cat", *FAST_ARGS],
                 ["generate", lib, "a <new1> dog", "-n", 1, "--steps", 1, "--out", tmp_path / "out"]):
        assert_refused(capsys, args, ["format 99", "newer", "upgrade"], lib)
    assert not (tmp_path / "out").exists()


def test_damaged_manifest(capsys, lib):
    (lib / "library.json").write_text('{"format_version": 1, "tasks": [')
    assert_refused(capsys, ["show", lib], ["library.json", "damaged"], lib)


def test_second_writer_refused_while_locked(capsys, lib, concept_folders):
    with exclusive_lock(lib):
        assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "cat", *FAST_ARGS],
                       ["another process", str(lib)], lib)
    # once the lock is released, the same learn goes through
    rc, out, err = run(capsys, "learn", lib, "--images", concept_folders[1], "--class-word", "cat", *FAST_ARGS)
    assert rc == 0, err
    assert ConceptLibrary(lib).tokens == ["<new1>", "<new2>"]


# ----------------------------------------------------------------------------- image sizes
def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares ``width`` x ``height`` but holds no pixel data: refusing it must not
    need decoding it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height, keywords", [
    (9000, 9000, ["huge.png", "9000x9000", "over 8192 px"]),
    (60000, 60000, ["huge.png", "too large to decode safely"]),  # past Pillow's decompression-bomb limit
], ids=["over-max-side", "decompression-bomb"])
def test_very_large_image_is_refused_before_decoding(capsys, lib, tmp_path, width, height, keywords):
    folder = _folder_with(tmp_path, "huge.png", None)
    _png_header_only(folder / "huge.png", width, height)
    assert_refused(capsys, ["learn", lib, "--images", folder, "--class-word", "cat", *FAST_ARGS], keywords, lib)


def test_images_smaller_than_the_model_are_learned_with_a_warning(capsys, lib, tmp_path):
    folder = write_dummy_images(tmp_path / "tiny", count=2, size=8)  # the dummy model draws 16 px
    rc, out, err = run(capsys, "learn", lib, "--images", folder, "--class-word", "cat", *FAST_ARGS)
    assert rc == 0, err
    assert err.strip().splitlines() == ["warning: 2 of 2 images are smaller than the model's 16 px "
                                        "(first: 00.png, 8x8 px)"]  # one line, however many images
    assert out.startswith("learned <new2> (cat)")


# ----------------------------------------------------------------------------- concepts_list paths
def test_concepts_list_may_point_outside_its_folder(tmp_path, concept_folders):
    """Relative folders are taken from the list's folder, ``..`` included: the list is the
    user's own file, so it may name any folder that exists."""
    shutil.copytree(concept_folders[1], tmp_path / "data" / "hat")
    listing = tmp_path / "lists" / "concepts.json"
    listing.parent.mkdir()
    listing.write_text(json.dumps([{"instance_prompt": "photo of a <h1> hat", "instance_data_dir": "../data/hat"},
                                   {"instance_prompt": "photo of a <d1> dog",
                                    "instance_data_dir": str(concept_folders[0])}]))
    specs = ConceptSpec.from_concepts_list(listing)
    assert [Path(s.images).resolve() for s in specs] == [(tmp_path / "data" / "hat").resolve(), concept_folders[0]]


def test_concepts_list_naming_a_file_as_its_folder(capsys, lib, tmp_path, concept_folders):
    listing = tmp_path / "concepts.json"
    listing.write_text(json.dumps([{"instance_prompt": "photo of a <h1> hat",
                                    "instance_data_dir": str(concept_folders[1] / "00.png")}]))
    assert_refused(capsys, ["learn", lib, "--concepts-list", listing, *FAST_ARGS],
                   ["concept 0", "00.png", "is not a folder"], lib)


# ----------------------------------------------------------------------------- captions
def test_captions_of_only_unknown_words_are_refused(capsys, lib, tmp_path, concept_folders):
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({f"0{i}.png": "zorbleflux quaxxing wibbertoon" for i in range(3)}))
    assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "hat",
                            "--captions", captions, *FAST_ARGS],
                   ["'zorbleflux quaxxing wibbertoon'", "00.png", "no word the tokenizer knows"], lib)


# ----------------------------------------------------------------------------- a full disk
def _fill_disk_after(monkeypatch, module, name: str, calls: int, only=lambda *a, **k: True) -> None:
    """``module.name`` writes half its output on its ``calls``-th matching call, then fails as a
    full disk does."""
    import errno

    original = getattr(module, name)
    seen = []

    def filling(*args, **kwargs):
        if only(*args, **kwargs):
            seen.append(1)
            if len(seen) == calls:
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, filling)


def test_disk_full_while_saving_the_task(capsys, monkeypatch, lib, concept_folders):
    import cns.library
    from safetensors.torch import save_file as real_save_file

    def half_then_full(tensors, path, **kwargs):
        real_save_file(tensors, path, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    calls = []
    monkeypatch.setattr(cns.library, "save_file",
                        lambda *a, **k: calls.append(1) or (half_then_full if len(calls) == 2 else real_save_file)(*a, **k))
    assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "dog", *FAST_ARGS],
                   ["disk full", "the library is unchanged"], lib)
    assert len(calls) == 2


def test_disk_full_while_replacing_the_manifest(capsys, monkeypatch, lib, concept_folders):
    import cns.storage

    _fill_disk_after(monkeypatch, cns.storage.json, "dump", 1,
                     only=lambda data, f, **k: Path(getattr(f, "name", "")).name.startswith(".library.json"))
    assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "dog", *FAST_ARGS],
                   ["disk full", "library.json", "unchanged"], lib)


def test_disk_full_while_caching_class_images(capsys, monkeypatch, lib, concept_folders):
    from PIL import Image as PILImage

    _fill_disk_after(monkeypatch, PILImage.Image, "save", 2, only=lambda self, fp, *a, **k: "class_images" in str(fp))
    assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "cat", *FAST_ARGS],
                   ["disk full", "class_images"], lib)
