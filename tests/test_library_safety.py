"""A concept library is never bricked, poisoned or emptied by one command (issue 25): each case
of the issue as an adversarial user runs it through the CLI, asserting the exit code, the one-line
message, and that the library is byte-identical afterwards, or repaired as documented; plus
``cns check --repair`` and ``cns remove``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cns import ConceptLibrary, ConceptSpec
from cns.library import later_overlaps
from cns.storage import file_sha256
from cns.testing import write_dummy_images

from .conftest import fast_config
from .test_bad_input import FAST_ARGS, assert_refused, run, snapshot


# ----------------------------------------------------------------------------- helpers
def flip_one_bit(path: Path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def images_of(library_path: Path, prompts, **kwargs) -> list[np.ndarray]:
    library = ConceptLibrary(library_path)
    pipe = library.load_pipeline()
    return [np.asarray(library.generate(p, n=1, steps=2, seed=3, pipe=pipe, **kwargs)[0]) for p in prompts]


@pytest.fixture
def lib3(three_concept_library) -> tuple[Path, list[Path]]:
    library, snapshots = three_concept_library
    return library.path, snapshots


# ----------------------------------------------------------------------------- 2. tokens in any case
def test_an_uppercase_token_round_trips_through_learn_show_generate_and_export(capsys, lib, concept_folders,
                                                                               tmp_path):
    rc, out, err = run(capsys, "learn", lib, "--images", concept_folders[1], "--class-word", "dog",
                       "--token", "<MyDog>", *FAST_ARGS)
    assert rc == 0, err
    assert "warning: token <MyDog> is stored as <mydog>" in err
    assert out.startswith("learned <mydog> (dog)")
    assert run(capsys, "check", lib)[0] == 0
    rc, out, _ = run(capsys, "show", lib, "--json")
    assert rc == 0 and [c["token"] for c in json.loads(out)["concepts"]] == ["<new1>", "<mydog>"]
    # generate: the token as the user spells it is the learned one (no unknown-token warning)
    rc, _, err = run(capsys, "generate", lib, "a <MyDog> dog", "-n", 1, "--steps", 2, "--out", tmp_path / "a")
    assert rc == 0 and err == "", err
    rc, _, _ = run(capsys, "generate", lib, "a <mydog> dog", "-n", 1, "--steps", 2, "--out", tmp_path / "b")
    same = [np.asarray(Image.open(tmp_path / d / "00000.png")) for d in ("a", "b")]
    assert np.array_equal(*same)
    # export: plain diffusers reads <MyDog> in a prompt as the learned token
    rc, _, err = run(capsys, "export", lib, tmp_path / "exported")
    assert rc == 0, err
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "exported")
    token_id = pipe.tokenizer.convert_tokens_to_ids("<mydog>")
    assert token_id in pipe.tokenizer("a <MyDog> dog", add_special_tokens=False).input_ids
    # and it can be taken back again by its spelling
    rc, out, err = run(capsys, "remove", lib, "<MyDog>")
    assert rc == 0, err
    assert ConceptLibrary(lib).tokens == ["<new1>"]


def test_a_token_equal_to_a_learned_one_up_to_case_is_refused(capsys, lib, concept_folders):
    assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "cat", "--token",
                            "<NEW1>", *FAST_ARGS], ["<new1>", "already used"], lib)


def test_a_library_bricked_by_an_older_cns_is_repaired(capsys, lib3, tmp_path):
    """An older cns stored a task whose embedding key (<mydog>) differs from its token (<MyDog>):
    every command failed. Now check names it, readers refuse it, and --repair sets it aside."""
    path, snapshots = lib3
    manifest = json.loads((path / "library.json").read_text())
    task = manifest["tasks"][-1]
    folder = path / task["dir"]
    record = json.loads((folder / "task.json").read_text())
    record["concepts"][0]["token"] = "<MyDog>"
    (folder / "task.json").write_text(json.dumps(record))
    masks = load_file(folder / "masks.safetensors")
    save_file({k.replace("<new3>", "<MyDog>"): v for k, v in masks.items()}, folder / "masks.safetensors")
    save_file({"<mydog>": load_file(folder / "embeddings.safetensors")["<new3>"]}, folder / "embeddings.safetensors")
    task["tokens"] = ["<MyDog>"]
    task["files"].update({name: file_sha256(folder / name) for name in task["files"]})
    (path / "library.json").write_text(json.dumps(manifest, indent=2))
    rc, out, err = run(capsys, "check", path)
    assert rc == 2 and "no embedding for <MyDog>" in out
    assert_refused(capsys, ["generate", path, "a <new1> dog", "-n", 1, "--steps", 1, "--out", tmp_path / "o"],
                   ["damaged", "no embedding for <MyDog>", "--repair"], path)
    rc, out, err = run(capsys, "check", path, "--repair")
    assert rc == 0, err
    assert "set aside task 3 (<MyDog>)" in out and "is sound" in out
    assert ConceptLibrary(path).tokens == ["<new1>", "<new2>"]
    prompts = ["a <new1> dog", "a <new2> hat", "a cat"]
    assert all(np.array_equal(a, b) for a, b in zip(images_of(path, prompts), images_of(snapshots[1], prompts)))


# ----------------------------------------------------------------------------- 3. non-finite training
def test_diverging_training_is_refused_and_nothing_is_committed(capsys, lib, concept_folders):
    assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "cat", "--lr-neurons", "1e8",
                            "--lr-embedding", "1e8", "--steps", "6", "--num-class-images", "2", "--class-image-steps",
                            "2", "--quiet"], ["training diverged", "nothing was saved", "--lr-neurons"], lib)
    # every prompt still draws what it drew before, the learned concept included
    assert ConceptLibrary(lib).verify() == []


def test_a_non_finite_loss_stops_training_before_it_reaches_the_weights(capsys, lib, concept_folders, monkeypatch):
    import cns.training

    real = cns.training.diffusion_target
    calls = []

    def poisoned(*args, **kwargs):  # the third step's target is NaN
        calls.append(1)
        target = real(*args, **kwargs)
        return target * float("nan") if len(calls) == 3 else target

    monkeypatch.setattr(cns.training, "diffusion_target", poisoned)
    line = assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "dog",
                                   "--checkpoint-every", "1", *FAST_ARGS[:1], "6", *FAST_ARGS[2:]],
                          ["diverged at step 3", "the loss is nan"], lib)
    assert "nothing was saved" in line
    assert not list(lib.glob(".checkpoint-*"))  # a checkpoint would only resume the same divergence


# ----------------------------------------------------------------------------- 4 / 5. damaged files are never used
@pytest.mark.parametrize("damage", ["bit-flip", "truncated"])
def test_generate_export_and_learn_refuse_a_damaged_library(capsys, lib, concept_folders, tmp_path, damage):
    values = lib / "tasks" / "0001" / "values.safetensors"
    if damage == "bit-flip":
        flip_one_bit(values)
    else:
        values.write_bytes(values.read_bytes()[:40])
    keywords = ["damaged", "tasks/0001/values.safetensors", f"cns check {lib} --repair"]
    assert_refused(capsys, ["generate", lib, "a <new1> dog", "-n", 1, "--steps", 1, "--out", tmp_path / "out"],
                   keywords, lib)
    assert not (tmp_path / "out").exists()
    assert_refused(capsys, ["export", lib, tmp_path / "exported"], keywords, lib)
    assert not (tmp_path / "exported").exists()
    assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "cat", *FAST_ARGS],
                   keywords, lib)


def test_repair_sets_the_damaged_last_task_aside_and_the_others_draw_what_they_drew(capsys, lib3):
    path, snapshots = lib3
    prompts = ["a <new1> dog", "a <new2> hat", "a cat"]
    expected = images_of(snapshots[1], prompts)  # the library before task 3
    flip_one_bit(path / "tasks" / "0003" / "values.safetensors")
    damaged = (path / "tasks" / "0003" / "values.safetensors").read_bytes()
    rc, out, err = run(capsys, "check", path, "--repair")
    assert rc == 0, err
    assert out.startswith("set aside task 3 (<new3>)") and "checksum mismatch" in out
    aside = next((path / "damaged").iterdir())
    assert (aside / "files" / "values.safetensors").read_bytes() == damaged  # moved, never deleted
    entry = json.loads((aside / "entry.json").read_text())
    assert entry["tokens"] == ["<new3>"] and entry["entry"]["dir"] == "tasks/0003"
    assert (path / "library.json").read_bytes() == (snapshots[1] / "library.json").read_bytes()
    assert all(np.array_equal(a, b) for a, b in zip(images_of(path, prompts), expected))
    rc, out, _ = run(capsys, "check", path, "--repair")
    assert rc == 0 and out.startswith("nothing to repair")


def test_repair_of_a_middle_task_keeps_the_later_tasks_values(capsys, lib3):
    path, _ = lib3
    library = ConceptLibrary(path)
    masks = library.concept_masks()
    before = {t["dir"]: t for t in library.tasks}
    flip_one_bit(path / "tasks" / "0002" / "masks.safetensors", offset_from_end=2)
    rc, out, err = run(capsys, "check", path, "--repair")
    assert rc == 0, err
    assert "set aside task 2 (<new2>)" in out and "kept <new3>" in out
    repaired = ConceptLibrary(path)
    assert repaired.tokens == ["<new1>", "<new3>"]
    assert repaired.tasks == [before["tasks/0001"], before["tasks/0003"]]
    # W = W_0, then task 1's values, then task 3's: task 3's elements hold exactly its stored values
    pipe = repaired.load_pipeline()
    from cns.model import cross_attention_kv_layers

    stored = load_file(path / "tasks" / "0003" / "values.safetensors")
    for name, layer in cross_attention_kv_layers(pipe.unet).items():
        index = masks[2][name].flatten().nonzero().squeeze(1)
        assert torch.equal(layer.weight.detach().flatten()[index], stored[name])


def test_a_manifest_entry_that_is_malformed_is_named_and_set_aside(capsys, lib3):
    path, _ = lib3
    manifest = json.loads((path / "library.json").read_text())
    manifest["tasks"][1] = 5
    (path / "library.json").write_text(json.dumps(manifest))
    rc, out, _ = run(capsys, "check", path)
    assert rc == 2 and "library.json: task 2 is malformed" in out
    rc, out, err = run(capsys, "check", path, "--repair")
    assert rc == 0, err
    assert ConceptLibrary(path).tokens == ["<new1>", "<new3>"]
    assert (path / "tasks" / "0002").is_dir()  # the entry named no folder: nothing was moved


# ----------------------------------------------------------------------------- cns remove
def test_remove_takes_back_the_last_task_exactly(capsys, lib3, concept_folders):
    path, snapshots = lib3
    rc, out, err = run(capsys, "remove", path, "<new3>")
    assert rc == 0, err
    assert "took back <new3> (task 3)" in out and "as it was before it" in out
    assert (path / "library.json").read_bytes() == (snapshots[1] / "library.json").read_bytes()
    assert not (path / "tasks" / "0003").exists()
    assert (next((path / "removed").iterdir()) / "files" / "values.safetensors").read_bytes() == \
        (snapshots[2] / "tasks" / "0003" / "values.safetensors").read_bytes()
    prompts = ["a <new1> dog", "a <new2> hat"]
    assert all(np.array_equal(a, b) for a, b in zip(images_of(path, prompts), images_of(snapshots[1], prompts)))
    # the token is free again
    rc, out, err = run(capsys, "learn", path, "--images", concept_folders[2], "--class-word", "cat", *FAST_ARGS)
    assert rc == 0 and out.startswith("learned <new3>"), err


def test_remove_refuses_an_earlier_task_whose_elements_a_later_one_trained(capsys, lib3):
    path, _ = lib3
    library = ConceptLibrary(path)
    unions = [library.concept_masks([t])[0] for t in library.tasks]
    assert later_overlaps(unions, {1}), "the fixture's tasks 2 and 3 share elements"
    assert_refused(capsys, ["remove", path, "<new2>"], ["cannot take back <new2>", "<new3> (task 3)",
                                                         "same K/V elements"], path)
    # together with the later task it goes
    rc, out, err = run(capsys, "remove", path, "<new3>", "<new2>")
    assert rc == 0, err
    assert ConceptLibrary(path).tokens == ["<new1>"] and ConceptLibrary(path).verify() == []


def test_remove_an_unknown_token_or_a_damaged_library_is_refused(capsys, lib3):
    path, _ = lib3
    assert_refused(capsys, ["remove", path, "<zebra>"], ["<zebra> is not a concept", "<new1>, <new2>, <new3>"], path)
    flip_one_bit(path / "tasks" / "0001" / "embeddings.safetensors")
    assert_refused(capsys, ["remove", path, "<new3>"], ["damaged", "--repair"], path)


def test_later_overlaps_finds_only_later_kept_tasks_that_share_elements():
    def task(*cells):
        mask = torch.zeros(2, 3, dtype=torch.bool)
        for r, c in cells:
            mask[r, c] = True
        return {"layer": mask}

    unions = [task((0, 0)), task((0, 1), (1, 1)), task((0, 0), (1, 2)), task((1, 1))]
    assert later_overlaps(unions, {0}) == [(0, 2, 1)]
    assert later_overlaps(unions, {1}) == [(1, 3, 1)]
    assert later_overlaps(unions, {1, 3}) == []  # taken back together
    assert later_overlaps(unions, {2}) == []  # nothing after it shares its elements: it may go alone
    assert later_overlaps(unions, {3}) == []  # the last task


def test_a_task_of_several_concepts_is_taken_back_whole(capsys, tmp_path, base_model, concept_folders):
    library = ConceptLibrary.create(tmp_path / "lib", str(base_model))
    library.learn([ConceptSpec(concept_folders[0], "dog"), ConceptSpec(concept_folders[1], "hat")], fast_config(),
                  progress=False)
    assert_refused(capsys, ["remove", library.path, "<new1>"], ["together", "name <new2> too"], library.path)
    rc, _, err = run(capsys, "remove", library.path, "<new1>", "<new2>")
    assert rc == 0, err
    assert ConceptLibrary(library.path).tokens == []


# ----------------------------------------------------------------------------- 7. the text encoder's length
def test_a_learned_token_past_the_text_encoders_length_is_an_error(capsys, lib, tmp_path):
    filler = " ".join(["dog"] * 20)
    assert_refused(capsys, ["generate", lib, f"a {filler} <new1> dog", "-n", 1, "--steps", 1, "--out", tmp_path / "o"],
                   ["longer than the text encoder reads (16 tokens)", "<new1> falls past the end"], lib)
    assert not (tmp_path / "o").exists()


def test_words_past_the_text_encoders_length_are_named_in_a_warning(capsys, lib, tmp_path):
    rc, _, err = run(capsys, "generate", lib, "a <new1> dog " + " ".join(["cat"] * 14) + " on the beach", "-n", 1,
                     "--steps", 1, "--out", tmp_path / "o")
    assert rc == 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the prompt is longer than the text encoder reads")
    assert "on the beach" in lines[0] and (tmp_path / "o" / "00000.png").is_file()


def test_a_caption_that_pushes_the_token_past_the_length_is_refused(capsys, lib, tmp_path, concept_folders):
    folder = tmp_path / "images"
    shutil.copytree(concept_folders[1], folder)
    long = "a " + " ".join(["red"] * 16) + " cat"
    (tmp_path / "captions.json").write_text(json.dumps({p.name: long for p in folder.glob("*.png")}))
    assert_refused(capsys, ["learn", lib, "--images", folder, "--class-word", "cat", "--captions",
                            tmp_path / "captions.json", *FAST_ARGS], ["training prompt", "falls past the end"], lib)


# ----------------------------------------------------------------------------- 9. Ctrl-C
@pytest.mark.parametrize("when", ["class images", "training", "saving"])
def test_ctrl_c_at_any_moment_leaves_the_library_byte_identical(capsys, lib, concept_folders, monkeypatch, when):
    import cns.generate
    import cns.library
    import cns.training

    def interrupt_on(module, name, call):
        real, calls = getattr(module, name), []

        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) == call:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    if when == "class images":
        interrupt_on(cns.generate, "generate_images", 2)  # one class image is already on disk
    elif when == "training":
        interrupt_on(cns.training, "step_generator", 2)  # the first step is taken
    else:
        interrupt_on(cns.library, "fsync_tree", 1)  # the task's files are written, not yet renamed
    before = snapshot(lib)
    rc, _, err = run(capsys, "learn", lib, "--images", concept_folders[1], "--class-word", "cat", *FAST_ARGS)
    assert rc == 130 and err.strip() == "error: interrupted; the library is unchanged"
    assert snapshot(lib) == before


def test_class_images_of_a_committed_task_are_cached_with_their_checksums(lib, concept_folders):
    library = ConceptLibrary(lib)
    library.learn([ConceptSpec(concept_folders[1], "cat")], fast_config(), progress=False)
    folder = lib / "class_images" / "photo-of-a-cat"
    index = json.loads((folder / "index.json").read_text())
    assert [e["file"] for e in index["files"]] == ["0000.png", "0001.png"]
    assert all(file_sha256(folder / e["file"]) == e["sha256"] for e in index["files"])
    assert not list(lib.glob(".staging-*"))
    # a damaged cached image is drawn again (the cache is cns's own), the others are reused
    (folder / "0001.png").write_bytes(b"not a png")
    stamp = (folder / "0000.png").stat().st_mtime_ns
    library.learn([ConceptSpec(concept_folders[2], "cat")], fast_config(), progress=False)
    assert (folder / "0000.png").stat().st_mtime_ns == stamp
    assert Image.open(folder / "0001.png").size == (16, 16)


# ----------------------------------------------------------------------------- 10 / 11. clear refusals
def test_captions_file_that_is_not_utf8(capsys, lib, tmp_path, concept_folders):
    captions = tmp_path / "captions.txt"
    captions.write_bytes(b"00.png\t\xff\xfe bad\n")
    assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "cat", "--captions", captions,
                            *FAST_ARGS], [str(captions), "utf-8"], lib)


def test_generate_out_that_is_a_file_is_refused_before_drawing(capsys, lib, tmp_path, monkeypatch):
    import cns.library

    target = tmp_path / "out.png"
    target.write_bytes(b"mine")
    monkeypatch.setattr(cns.library.ConceptLibrary, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    assert_refused(capsys, ["generate", lib, "a <new1> dog", "-n", 1, "--out", target], [str(target), "is a file"], lib)
    assert target.read_bytes() == b"mine"


@pytest.mark.parametrize("args, keywords", [
    (["--height", "-8"], ["--height must be a positive number", "-8"]),
    (["--width", "0"], ["--width must be a positive number", "got 0"]),
    (["--height", "7"], ["--height 7 must be a multiple of 2", "e.g. 6 or 8"]),
    (["--guidance", "nan"], ["--guidance", "finite"]),
], ids=["height-negative", "width-zero", "height-odd", "guidance-nan"])
def test_generate_sizes_the_model_cannot_draw(capsys, lib, tmp_path, args, keywords):
    assert_refused(capsys, ["generate", lib, "a <new1> dog", "-n", 1, "--steps", 1, *args, "--out", tmp_path / "o"],
                   keywords, lib)
    assert not (tmp_path / "o").exists()


def test_learn_resolution_the_model_cannot_draw(capsys, lib, concept_folders):
    assert_refused(capsys, ["learn", lib, "--images", concept_folders[1], "--class-word", "cat", "--resolution", "3",
                            *FAST_ARGS], ["--resolution 3 must be a multiple of 2"], lib)


def test_a_class_word_the_tokenizer_does_not_know_is_warned_about_with_its_pieces(capsys, lib, concept_folders):
    rc, out, err = run(capsys, "learn", lib, "--images", concept_folders[1], "--class-word", "qzx", *FAST_ARGS)
    assert rc == 0, err
    assert "warning: class word 'qzx' is not a word the tokenizer knows: it is split into" in err


@pytest.mark.parametrize("manifest, keywords", [
    ({"format_version": 1}, ["library.json is damaged", "base_model"]),
    ("not-json-object", ["library.json is damaged", "not a JSON object"]),
    ("no-tasks", ["library.json is damaged", "no task list"]),
], ids=["no-base", "a-string", "no-tasks"])
def test_a_manifest_of_the_wrong_shape_is_named_by_every_command(capsys, lib, tmp_path, concept_folders, manifest,
                                                                  keywords):
    data = json.loads((lib / "library.json").read_text())
    if manifest == "not-json-object":
        manifest = ["a", "list"]
    elif manifest == "no-tasks":
        manifest = {k: v for k, v in data.items() if k != "tasks"}
    (lib / "library.json").write_text(json.dumps(manifest))
    for args in (["show", lib], ["check", lib], ["check", lib, "--repair"], ["remove", lib, "<new1>"],
                 ["export", lib, tmp_path / "e"],
                 ["generate", lib, "a <new1> dog", "-n", 1, "--steps", 1, "--out", tmp_path / "o"],
                 ["learn", lib, "--images", concept_folders[1], "--class-word", "cat", *FAST_ARGS]):
        assert_refused(capsys, args, keywords, lib)


def test_a_read_only_library_is_refused_in_one_line(capsys, lib, concept_folders, monkeypatch):
    import os

    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".lock") and flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    for args in (["learn", lib, "--images", concept_folders[1], "--class-word", "cat", *FAST_ARGS],
                 ["remove", lib, "<new1>"], ["check", lib, "--repair"]):
        assert_refused(capsys, args, ["cannot write to library", "permission denied"], lib)


@pytest.mark.parametrize("entry, keywords", [
    ({"instance_prompt": 5, "instance_data_dir": "x"}, ["instance_prompt must be a string, not 5"]),
    ({"instance_prompt": "a <x> dog", "instance_data_dir": ["a"]}, ["instance_data_dir must be a string"]),
    ({"instance_prompt": "a <x> dog", "instance_data_dir": "x", "class_prompt": 3}, ["class_prompt must be a string"]),
], ids=["prompt-number", "folder-list", "class-prompt-number"])
def test_concepts_list_with_values_of_the_wrong_type(capsys, lib, tmp_path, entry, keywords):
    listing = tmp_path / "concepts.json"
    listing.write_text(json.dumps([entry]))
    assert_refused(capsys, ["learn", lib, "--concepts-list", listing, *FAST_ARGS], [str(listing), *keywords], lib)


def test_generate_never_overwrites_a_users_file_and_replaces_its_own_only_with_force(capsys, lib, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.png").write_bytes(b"my picture")
    for extra in ([], ["--force"]):
        assert_refused(capsys, ["generate", lib, "a <new1> dog", "-n", 1, "--steps", 1, "--out", out, *extra],
                       [str(out / "00000.png")], lib)
        assert (out / "00000.png").read_bytes() == b"my picture"
    # images cns wrote: refused without --force, replaced with it; a user's file beside them stays
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert run(capsys, "generate", lib, "a <new1> dog", "-n", 2, "--steps", 1, "--out", mine)[0] == 0
    assert "Seed: 1" in Image.open(mine / "00001.png").text["parameters"]  # A1111's parameters text
    assert_refused(capsys, ["generate", lib, "a <new1> dog", "-n", 1, "--steps", 1, "--out", mine],
                   ["already exists", "--force"], lib)
    rc, _, err = run(capsys, "generate", lib, "a dog", "-n", 1, "--steps", 1, "--out", mine, "--force")
    assert rc == 0, err
    assert Image.open(mine / "00000.png").text["parameters"].startswith("a dog\n")
    assert (mine / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in mine.iterdir()) == ["00000.png", "00001.png", "grid.png", "notes.txt"]


def test_export_never_writes_into_a_folder_that_holds_files(capsys, lib, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert_refused(capsys, ["export", lib, out], [str(out), "not empty"], lib)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert not list(tmp_path.glob(".model.export-*"))


def test_learn_with_many_images_warns_once_with_the_count(capsys, lib, tmp_path):
    folder = write_dummy_images(tmp_path / "many", count=22, size=16)
    rc, _, err = run(capsys, "learn", lib, "--images", folder, "--class-word", "cat", *FAST_ARGS)
    assert rc == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "22 images" in lines[0]
