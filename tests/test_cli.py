"""The ``cns`` command line end to end on the dummy model: init, learn (default and chosen
tokens, a diffusers concepts_list), show, generate, export, and the exported pipeline loaded by
plain diffusers in a process that never imports cns."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cns import ConceptLibrary
from cns.cli import main
from cns.testing import write_dummy_images

# Fast training settings for the dummy model (see conftest.FAST).
FAST_ARGS = ["--steps", "4", "--num-class-images", "2", "--class-image-steps", "2", "--quiet"]
COMPONENT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
}


def _env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def cli(*args) -> tuple[int, str, str]:
    """``cns ARGS`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def run_main(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _token_embedding_key(state: dict) -> str:
    (key,) = [k for k in state if k.endswith("token_embedding.weight")]
    return key


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, base_model, concept_folders):
    """A library built only through the CLI: init, then two learns with default tokens."""
    root = tmp_path_factory.mktemp("cli")
    lib = root / "lib"
    steps = {
        "init": cli("init", lib, "--model", base_model),
        "learn1": cli("learn", lib, "--images", concept_folders[0], "--class-word", "dog", *FAST_ARGS),
        "learn2": cli("learn", lib, "--images", concept_folders[1], "--class-word", "hat", *FAST_ARGS),
    }
    for name, (rc, out, err) in steps.items():
        assert rc == 0, f"{name} failed: {err}"
    return lib, steps


@pytest.fixture(scope="module")
def exported(cli_run, tmp_path_factory):
    lib, _ = cli_run
    out = tmp_path_factory.mktemp("export") / "pipeline"
    rc, stdout, stderr = cli("export", lib, out)
    assert rc == 0, stderr
    assert "Traceback" not in stdout + stderr
    assert str(out) in stdout and "from_pretrained" in stdout
    return out


def test_console_script_entry_point_and_exit_codes(cli_run, tmp_path):
    lib, _ = cli_run
    # the installed `cns` script maps to cns.cli:main
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("cns") == "cns.cli:main"

    ok = subprocess.run([sys.executable, "-m", "cns.cli", "show", str(lib), "--json"], capture_output=True,
                        text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert [c["token"] for c in json.loads(ok.stdout)["concepts"]] == ["<new1>", "<new2>"]
    assert "Traceback" not in ok.stderr

    missing = tmp_path / "no-library"
    bad = subprocess.run([sys.executable, "-m", "cns.cli", "show", str(missing)], capture_output=True, text=True,
                         env=_env(), cwd=tmp_path, timeout=300)
    assert bad.returncode == 2
    assert bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "not a concept library" in lines[0], bad.stderr
    assert "Traceback" not in bad.stderr


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["init", "somewhere"])  # --model is required
    assert exc.value.code == 2 and "--model" in capsys.readouterr().err


def test_init_then_two_learns_assign_tokens_in_order(cli_run, base_model):
    lib, steps = cli_run
    rc, out, err = steps["init"]
    assert "created concept library" in out and str(lib) in out
    assert "(8 cross-attention K/V layers)" in out and err.strip() == ""
    assert (lib / "library.json").is_file()

    _, out1, err1 = steps["learn1"]
    _, out2, err2 = steps["learn2"]
    assert out1.startswith("learned <new1> (dog):") and "concept neurons" in out1
    assert out2.startswith("learned <new2> (hat):")
    # --quiet: nothing on stderr (no training bars, no loading bars)
    assert err1.strip() == "" and err2.strip() == "", (err1, err2)

    library = ConceptLibrary(lib)
    assert library.tokens == ["<new1>", "<new2>"]
    assert [t["dir"] for t in library.tasks] == ["tasks/0001", "tasks/0002"]
    assert library.base_model["name_or_path"] == str(Path(base_model).resolve())
    masks = library.concept_masks()
    assert len(masks) == 2 and all(any(bool(m.any()) for m in mask.values()) for mask in masks)


def test_learn_with_chosen_token(cli_run, tmp_path, concept_folders, capsys):
    lib, _ = cli_run
    copy = tmp_path / "lib"
    shutil.copytree(lib, copy)
    rc, out, err = run_main(capsys, "learn", copy, "--images", concept_folders[2], "--class-word", "cat",
                            "--token", "<my-dog>", *FAST_ARGS)
    assert rc == 0, err
    assert out.startswith("learned <my-dog> (cat):")
    library = ConceptLibrary(copy)
    assert library.tokens == ["<new1>", "<new2>", "<my-dog>"]
    assert library.tasks[-1]["tokens"] == ["<my-dog>"]
    # the next default token continues after the highest <newK>
    rc, out, err = run_main(capsys, "learn", copy, "--images", concept_folders[0], "--class-word", "bird",
                            *FAST_ARGS)
    assert rc == 0, err
    assert out.startswith("learned <new3> (bird):")


def test_show_table_and_json(cli_run, capsys):
    lib, _ = cli_run
    rc, out, err = run_main(capsys, "show", lib)
    assert rc == 0 and err == ""
    assert "<new1>" in out and "<new2>" in out and "dog" in out and "hat" in out
    assert "K/V untouched" in out and "format 1" in out

    rc, out, err = run_main(capsys, "show", lib, "--json")
    assert rc == 0 and err == ""
    summary = json.loads(out)  # exactly one JSON object, nothing else on stdout
    assert isinstance(summary, dict)
    concepts = summary["concepts"]
    assert [(c["token"], c["class_word"]) for c in concepts] == [("<new1>", "dog"), ("<new2>", "hat")]
    assert all(c["neurons"] > 0 and c["images"] == 3 for c in concepts)
    assert 0 < summary["kv_untouched_fraction"] < 1
    assert summary["kv_touched"] <= sum(c["neurons"] for c in concepts)
    assert summary["format_version"] == 1


def test_generate_writes_images_and_grid(cli_run, tmp_path, capsys):
    lib, _ = cli_run
    out_dir = tmp_path / "images"
    rc, out, err = run_main(capsys, "generate", lib, "a <new1> dog with a <new2> hat", "-n", 2, "--steps", 2,
                            "--out", out_dir)
    assert rc == 0, err
    assert "warning" not in err and "Traceback" not in err
    assert "wrote 2 images" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["00000.png", "00001.png", "grid.png"]
    for name in ("00000.png", "00001.png"):
        with Image.open(out_dir / name) as image:
            assert image.format == "PNG" and image.size == (16, 16) and image.mode == "RGB"
    with Image.open(out_dir / "grid.png") as grid:
        assert grid.size == (2 * 16 + 3 * 2, 16 + 2 * 2)  # two columns, one row, 2 px padding

    # same seed, same images
    again = tmp_path / "again"
    rc, _, err = run_main(capsys, "generate", lib, "a <new1> dog with a <new2> hat", "-n", 2, "--steps", 2,
                          "--out", again)
    assert rc == 0, err
    for name in ("00000.png", "00001.png"):
        with Image.open(out_dir / name) as a, Image.open(again / name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_export_loads_in_plain_diffusers_without_cns(exported, tmp_path):
    script = textwrap.dedent(
        """
        import json, sys
        import torch
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
        pipe.set_progress_bar_config(disable=True)
        ids = {t: pipe.tokenizer(t, add_special_tokens=False).input_ids for t in ("<new1>", "<new2>")}
        out = pipe("a <new1> dog with a <new2> hat", num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        print(json.dumps({
            "ids": ids,
            "vocab": len(pipe.tokenizer),
            "rows": pipe.text_encoder.get_input_embeddings().weight.shape[0],
            "shape": list(out.images.shape),
            "finite": bool(torch.isfinite(torch.from_numpy(out.images)).all()),
            "cns_imported": any(m == "cns" or m.startswith("cns.") for m in sys.modules),
        }))
        """
    )
    result = subprocess.run([sys.executable, "-c", script, str(exported)], capture_output=True, text=True,
                            env=_env(), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["cns_imported"]
    ids = report["ids"]
    assert len(ids["<new1>"]) == 1 and len(ids["<new2>"]) == 1 and ids["<new1>"] != ids["<new2>"]
    assert report["rows"] == report["vocab"]
    assert report["shape"] == [1, 16, 16, 3] and report["finite"]
    manifest = json.loads((exported / "cns_concepts.json").read_text())
    assert [c["token"] for c in manifest["concepts"]] == ["<new1>", "<new2>"]


def test_export_changes_only_concept_neurons_and_new_token_rows(exported, cli_run, base_model):
    lib, _ = cli_run
    library = ConceptLibrary(lib)
    masks = library.concept_masks()
    union = {name: masks[0][name] | masks[1][name] for name in masks[0]}
    kv_keys = {f"{name}.weight": name for name in union}

    changed_kv = 0
    for component, file in COMPONENT_FILES.items():
        base = load_file(Path(base_model) / file)
        export = load_file(exported / file)
        assert base.keys() == export.keys(), component
        for key, before in base.items():
            after = export[key]
            if key in kv_keys:
                assert after.shape == before.shape and after.dtype == before.dtype
                differs = after != before
                outside = differs & ~union[kv_keys[key]]
                assert not outside.any(), f"{key} changed outside the concept neurons"
                changed_kv += int(differs.sum())
            elif component == "text_encoder" and key == _token_embedding_key(base):
                assert after.shape == (before.shape[0] + 2, before.shape[1])
                assert torch.equal(after[: before.shape[0]], before), "existing token rows changed"
                assert not torch.equal(after[-1], after[-2])
            else:
                assert torch.equal(after, before), f"{component} {key} differs from the base model"
    assert len(kv_keys) == 8 and set(kv_keys) <= set(load_file(exported / COMPONENT_FILES["unet"]))
    assert changed_kv > 0, "training changed no K/V weight"


def test_learn_concepts_list(tmp_path, base_model, capsys):
    root = tmp_path / "data"
    write_dummy_images(root / "instance" / "cat", count=2, seed=11, color=(220, 120, 0))
    write_dummy_images(root / "instance" / "hat", count=3, seed=12, color=(0, 120, 220))
    write_dummy_images(root / "class" / "cat", count=2, seed=13, color=(90, 90, 90))
    write_dummy_images(root / "class" / "hat", count=2, seed=14, color=(30, 30, 30))
    concepts = [
        {"instance_prompt": "photo of a <new7> cat", "class_prompt": "cat",
         "instance_data_dir": "instance/cat", "class_data_dir": "class/cat"},
        {"instance_prompt": "photo of a <new8> hat", "class_prompt": "hat",
         "instance_data_dir": "instance/hat", "class_data_dir": "class/hat"},
    ]
    (root / "concepts.json").write_text(json.dumps(concepts))
    lib = tmp_path / "lib"
    assert run_main(capsys, "init", lib, "--model", base_model)[0] == 0

    # relative folders resolve from the JSON's folder, not the working directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        rc, out, err = run_main(capsys, "learn", lib, "--concepts-list", root / "concepts.json", *FAST_ARGS)
    finally:
        os.chdir(cwd)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("learned <new7> (cat):") and lines[1].startswith("learned <new8> (hat):")

    library = ConceptLibrary(lib)
    assert len(library.tasks) == 1 and library.tasks[0]["tokens"] == ["<new7>", "<new8>"]
    concepts_learned = library.concepts
    assert [c["token"] for c in concepts_learned] == ["<new7>", "<new8>"]
    assert [len(c["images"]) for c in concepts_learned] == [2, 3]
    assert concepts_learned[0]["source_folder"] == str((root / "instance" / "cat").resolve())
    assert concepts_learned[0]["instance_prompts"] == ["photo of a <new7> cat"] * 2
    assert concepts_learned[1]["class_prompt"] == "hat"
    # the given class images were used: none generated into the library
    assert not (lib / "class_images").exists()
    masks = library.concept_masks()
    assert len(masks) == 2
    assert all(sum(int(m.sum()) for m in mask.values()) == c["neurons"] > 0
               for mask, c in zip(masks, concepts_learned))
    assert any(not torch.equal(masks[0][n], masks[1][n]) for n in masks[0]), "the two concepts share one mask"
