"""The demo's prompts put each kind of concept in the slot the world's captions have for it."""

import pytest

from cns.world.concepts import get_concept
from cns.world.demo import DEFAULT_DEMO_CONCEPTS, _multi_prompts, concept_prompt
from cns.world.render import caption_words, vocabulary_words


def test_concept_prompts_use_the_token_in_its_slot_and_world_words_only():
    assert concept_prompt("object", "<new1>", "heart") == "a big <new1> heart in the center, on a gray background, flat style"
    assert concept_prompt("scene", "<new2>", "background").endswith("on a <new2> background, flat style")
    assert concept_prompt("style", "<new3>", "style").endswith(", <new3> style")
    # without a token the prompt is a plain world caption the base model understands
    for kind, word in [("object", "heart"), ("creature", "bird"), ("scene", "background"), ("style", "style")]:
        for which in (0, 1):
            assert set(caption_words(concept_prompt(kind, "", word, which))) <= set(vocabulary_words())


def test_demo_covers_several_kinds_and_combines_them():
    concepts = [get_concept(n) for n in DEFAULT_DEMO_CONCEPTS]
    assert len({c.kind for c in concepts}) >= 3
    learned = [(c, f"<new{i + 1}>") for i, c in enumerate(concepts)]
    prompts = _multi_prompts(learned)
    assert any(len(names) == 3 for _, names in prompts)  # object + scene + style in one prompt
    for prompt, names in prompts:
        assert all(f"<new{i + 1}>" in prompt for i, c in enumerate(concepts) if c.name in names)


def test_overview_grid_puts_examples_base_and_learned_images_in_one_row_per_concept(tmp_path):
    from PIL import Image

    from cns.generate import image_grid
    from cns.world.demo import _overview_grid

    (tmp_path / "concepts" / "a").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    for k in range(3):
        Image.new("RGB", (64, 64), (10 * k, 0, 0)).save(tmp_path / "concepts" / "a" / f"{k}.png")
    colors = {"before": (0, 0, 255), "after": (0, 255, 0), "multi": (255, 255, 0)}
    for name, color in colors.items():
        image_grid([Image.new("RGB", (32, 32), color)] * 2, cols=2).save(tmp_path / "images" / f"{name}.png")
    results = {
        "concepts": [{"token": "<new1>", "name": "a", "examples": "concepts/a", "before_image": "images/before.png",
                      "after_image": "images/after.png"}],
        "multi": [{"concepts": ["a", "b"], "image": "images/multi.png"}],
    }
    grid = _overview_grid(tmp_path, results, cell=16, pad=2)
    pixels = grid.load()
    row0 = 18 + 8  # header, then the middle of the first row of cells
    seen = {pixels[x, row0] for x in range(grid.width)}
    assert colors["before"] in seen and colors["after"] in seen and (20, 0, 0) in seen
    row1 = 18 + 18 + 8
    assert colors["multi"] in {pixels[x, row1] for x in range(grid.width)}
    # 3 examples + 2 base + 2 learned cells of 16 px, with the label column and gaps
    assert grid.width == 150 + 3 * 18 + 2 * 18 + 2 * 18 + 3 * 12


def test_demo_runs_end_to_end_on_the_shipped_world(tmp_path):
    """The main job, shrunk (2 concepts, 2 training steps, 1 image a prompt): it writes the report,
    the overview picture and a sound library whose tokens are the concepts it learned."""
    import json
    import math

    from cns.library import ConceptLibrary
    from cns.world.demo import DemoSettings, run_demo
    from cns.world.evaluator import EVALUATOR_PATH
    from cns.world.pretrain import DEFAULT_MODEL_PATH

    if not (DEFAULT_MODEL_PATH / "model_index.json").is_file() or not (EVALUATOR_PATH / "config.json").is_file():
        pytest.skip("tiny-world weights not built")
    settings = DemoSettings(out=tmp_path / "demo", concepts=("starry-night", "berry-heart"),
                            learn={"steps": 2, "num_class_images": 1}, images_per_prompt=1, sample_steps=2)
    settings.out.mkdir()
    (settings.out / "keep.txt").write_bytes(b"the user's")
    (settings.out / ".cns-demo.json").write_text('{"made_by": "cns demo", "files": []}')  # as if killed at once
    results = run_demo(settings, progress=False)
    assert [c["name"] for c in results["concepts"]] == ["starry-night", "berry-heart"]
    for c in results["concepts"]:
        assert all(math.isfinite(c[when][m]) for when in ("before", "after") for m in ("clip_i", "clip_t"))
        assert 0 < c["density"] < 1
    assert results["concepts"][0]["after_later_tasks"]  # the first concept is measured again after the second
    assert [m["concepts"] for m in results["multi"]] == [["berry-heart", "starry-night"]]  # object in the scene
    out = settings.out
    assert (out / "overview.png").is_file() and "overview.png" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["concepts"][1]["token"] == "<new2>"
    library = ConceptLibrary(out / "library")
    assert library.verify() == []
    assert [c["token"] for c in library.summary()["concepts"]] == ["<new1>", "<new2>"]
    # the marker names every file the demo wrote: the report, the library's (its dotfiles too), ...
    marker = json.loads((out / ".cns-demo.json").read_text())
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if p.is_file() and p.name not in (".cns-demo.json", "keep.txt"))
    assert marker["made_by"] == "cns demo" and marker["files"] == written
    assert {"report.md", "overview.png", "results.json", "library/library.json"} <= set(marker["files"])
    assert any(f.startswith("library/") and f.split("/")[-1].startswith(".") for f in marker["files"])
    # ... so that a second run into the same folder replaces them, and a file of the user's beside them stays
    assert (out / "keep.txt").read_bytes() == b"the user's"
    run_demo(settings, progress=False)
    assert (out / "keep.txt").read_bytes() == b"the user's"
    assert [c["token"] for c in ConceptLibrary(out / "library").summary()["concepts"]] == ["<new1>", "<new2>"]
    assert json.loads((out / ".cns-demo.json").read_text())["files"] == written


# --- the demo folder: cns never deletes or overwrites what it did not write (issue 25) -------------

def _snapshot(folder):
    """Every file and folder under ``folder``: path -> bytes (None for a folder)."""
    return {p.relative_to(folder).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in folder.rglob("*")}


def _earlier_demo(folder, extra_listed=()):
    """A folder as an earlier demo leaves it: its files, and the marker listing them."""
    import json

    files = {
        "library/manifest.json": b"{}", "library/.lock": b"", "library/tasks/1/delta.safetensors": b"\x00\x01",
        "images/1-a-before.png": b"png1", "images/1-a-after.png": b"png2", "concepts/a/00.png": b"png3",
        "concepts/a/captions.json": b"{}", "report.md": b"# report", "overview.png": b"png4", "results.json": b"{}",
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    listed = sorted([*files, *extra_listed])
    (folder / ".cns-demo.json").write_text(json.dumps({"made_by": "cns demo", "files": listed}))
    return files


def _users_folder(d):
    """``d`` as a user's folder: a file, and a file in a sub-folder."""
    (d / "mystuff").mkdir(parents=True)
    (d / "user.txt").write_bytes(b"my notes\n")
    (d / "mystuff" / "thesis.tex").write_bytes(b"\\documentclass{article}\n")


def _refusal(d, match=None) -> str:
    """``prepare_demo_folder(d)`` refuses in one line (matching ``match``) and leaves ``d`` as it
    was; returns the message."""
    from cns.errors import CNSError
    from cns.world.demo import prepare_demo_folder

    before = _snapshot(d)
    with pytest.raises(CNSError, match=match) as error:
        prepare_demo_folder(d)
    assert _snapshot(d) == before
    assert "\n" not in str(error.value)
    return str(error.value)


def _marker(folder):
    import json

    return json.loads((folder / ".cns-demo.json").read_text())


def test_demo_folder_of_the_user_is_refused_and_left_byte_identical(tmp_path):
    d = tmp_path / "D"
    _users_folder(d)
    message = _refusal(d)
    assert str(d) in message and "cns did not make" in message
    assert not (d / ".cns-demo.json").exists()


def test_demo_folder_of_the_user_with_names_like_the_demos_is_refused(tmp_path):
    """Names are no proof: without the marker, report.md and images/ are the user's."""
    d = tmp_path / "D"
    (d / "images").mkdir(parents=True)
    (d / "images" / "holiday.png").write_bytes(b"photo")
    (d / "report.md").write_bytes(b"my report")
    _refusal(d, "cns did not make")


def test_demo_cli_refuses_a_user_folder_with_one_error_line(tmp_path, capsys):
    from cns.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")  # passes the model check; the folder check comes first
    d = tmp_path / "D"
    _users_folder(d)
    before = _snapshot(d)
    assert main(["demo", "--out", str(d), "--model", str(model), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(d) in err and len(err.splitlines()) == 1
    assert _snapshot(d) == before


def test_demo_folder_that_is_a_file_is_refused(tmp_path):
    from cns.errors import CNSError
    from cns.world.demo import prepare_demo_folder

    f = tmp_path / "D"
    f.write_bytes(b"not a folder")
    with pytest.raises(CNSError) as error:
        prepare_demo_folder(f)
    assert str(f) in str(error.value) and "not a folder" in str(error.value) and "\n" not in str(error.value)
    assert f.read_bytes() == b"not a folder"


def test_missing_or_empty_demo_folder_is_used_and_marked(tmp_path):
    from cns.world.demo import prepare_demo_folder

    missing = tmp_path / "new" / "D"
    prepare_demo_folder(missing)
    assert missing.is_dir() and [p.name for p in missing.iterdir()] == [".cns-demo.json"]
    assert _marker(missing)["made_by"] == "cns demo" and _marker(missing)["files"] == []
    empty = tmp_path / "E"
    empty.mkdir()
    prepare_demo_folder(empty)
    assert [p.name for p in empty.iterdir()] == [".cns-demo.json"]
    assert _marker(empty)["files"] == []
    prepare_demo_folder(empty)  # a folder holding only the marker: a killed earlier demo
    assert [p.name for p in empty.iterdir()] == [".cns-demo.json"]


def test_earlier_demo_folder_is_cleared_of_its_listed_files_only(tmp_path):
    from cns.world.demo import prepare_demo_folder

    d = tmp_path / "D"
    (d / "mystuff").mkdir(parents=True)
    _earlier_demo(d, extra_listed=["notes.txt", "images/gone.png", "../outside.txt"])
    (d / "notes.txt").write_bytes(b"mine")  # listed by a forged marker, but not under the demo's entries
    (d / "mystuff" / "thesis.tex").write_bytes(b"thesis")
    (tmp_path / "outside.txt").write_bytes(b"outside")
    prepare_demo_folder(d)
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*")) == [
        ".cns-demo.json", "mystuff", "mystuff/thesis.tex", "notes.txt"]
    assert (d / "notes.txt").read_bytes() == b"mine" and (d / "mystuff" / "thesis.tex").read_bytes() == b"thesis"
    assert (tmp_path / "outside.txt").read_bytes() == b"outside"
    assert _marker(d)["files"] == []


def test_earlier_demo_folder_with_a_user_file_inside_its_entries_is_refused(tmp_path):
    d = tmp_path / "D"
    d.mkdir()
    _earlier_demo(d)
    (d / "notes.txt").write_bytes(b"mine")
    (d / "images" / "my-drawing.png").write_bytes(b"user drawing")
    message = _refusal(d)
    assert str(d / "images" / "my-drawing.png") in message and "nothing was deleted" in message


@pytest.mark.parametrize("change, match", [
    (lambda d: (d / "concepts" / "my-empty-folder").mkdir(), "my-empty-folder"),
    (lambda d: (d / ".cns-demo.json").write_text("{not json"), "damaged"),
], ids=["user-folder-inside", "damaged-marker"])
def test_earlier_demo_folder_that_cannot_be_trusted_is_refused(tmp_path, change, match):
    d = tmp_path / "D"
    d.mkdir()
    _earlier_demo(d)
    change(d)
    _refusal(d, match)


def test_demo_marker_lists_everything_under_the_demos_entries(tmp_path):
    from cns.world.demo import write_demo_marker

    d = tmp_path / "D"
    d.mkdir()
    files = _earlier_demo(d)
    (d / "notes.txt").write_bytes(b"mine")
    write_demo_marker(d)
    marker = _marker(d)
    assert marker["made_by"] == "cns demo" and marker["files"] == sorted(files)  # .lock too, notes.txt not
    assert "library/tasks" in marker["folders"] and "images" in marker["folders"]
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
