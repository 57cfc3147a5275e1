"""Settings that travel with a base model (cns_settings.json): recorded by init, used by learn
without flags, overridden by flags; --method paper; the shipped tiny-world model by name."""

from __future__ import annotations

import json
import shutil

import pytest

from cns import ConceptLibrary
from cns.cli import main
from cns.model_settings import SETTINGS_FILE, read_model_settings, resolve_model


@pytest.fixture
def model_with_settings(tmp_path, base_model):
    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    settings = {"learn": {"steps": 3, "lr_neurons": 0.02, "lr_embedding": 0.01, "num_class_images": 1,
                          "class_image_steps": 2, "lambda_keep": 5.0},
                "calibration_prompts": ["a photo of a house", "a red car"]}
    (model / SETTINGS_FILE).write_text(json.dumps(settings))
    return model


def test_init_records_the_models_settings_and_learn_uses_them_without_flags(tmp_path, model_with_settings,
                                                                             concept_folders, capsys):
    lib = tmp_path / "lib"
    assert main(["init", str(lib), "--model", str(model_with_settings)]) == 0
    assert "learning defaults from the model's cns_settings.json: steps 3" in capsys.readouterr().out
    library = ConceptLibrary(lib)
    assert library.manifest["calibration_prompts"] == ["a photo of a house", "a red car"]
    assert library.default_config().steps == 3 and library.default_config().lr_neurons == 0.02
    assert main(["learn", str(lib), "--images", str(concept_folders[0]), "--class-word", "dog", "--quiet"]) == 0
    assert main(["learn", str(lib), "--images", str(concept_folders[1]), "--class-word", "hat", "--quiet",
                 "--steps", "2"]) == 0
    assert main(["learn", str(lib), "--images", str(concept_folders[2]), "--class-word", "cat", "--quiet",
                 "--method", "paper"]) == 0
    library = ConceptLibrary(lib)
    configs = [library.task_record(t)["config"] for t in library.tasks]
    assert [c["steps"] for c in configs] == [3, 2, 3]  # the model's, a flag over it, the model's
    assert [c["lr_neurons"] for c in configs] == [0.02] * 3
    assert [c["lambda_keep"] for c in configs] == [5.0, 5.0, 0.0]  # --method paper: Eq. 7-8 only
    assert [len(library.task_record(t)["training"]) > 0 for t in library.tasks] == [True] * 3


def test_a_model_without_settings_keeps_the_papers_defaults(tmp_path, base_model):
    from cns import LearnConfig

    library = ConceptLibrary.create(tmp_path / "lib", str(base_model))
    assert library.manifest["learn_defaults"] == {}
    assert library.default_config() == LearnConfig()


@pytest.mark.parametrize("content, message", [
    ('{"learn": {"stepz": 3}}', "unknown learn settings stepz"),
    ('{"learn": {"lr_neurons": -1}}', "learning rate"),
    ('{"calibration_prompts": "a house"}', "list of prompts"),
    ("[1, 2", "cannot read"),
])
def test_a_broken_settings_file_is_refused_with_its_name(tmp_path, model_with_settings, content, message, capsys):
    (model_with_settings / SETTINGS_FILE).write_text(content)
    assert main(["init", str(tmp_path / "lib"), "--model", str(model_with_settings)]) == 2
    err = capsys.readouterr().err
    assert message in err and SETTINGS_FILE in err
    assert not (tmp_path / "lib").exists()


def test_the_shipped_tiny_world_model_is_known_by_name(tmp_path):
    from cns.world.pretrain import DEFAULT_MODEL_PATH

    assert resolve_model("tiny-world") == str(DEFAULT_MODEL_PATH)
    assert resolve_model("some/hub-id") == "some/hub-id"
    library = ConceptLibrary.create(tmp_path / "lib", "tiny-world")
    assert library.base_model["name_or_path"] == str(DEFAULT_MODEL_PATH.resolve())
    shipped = read_model_settings(str(DEFAULT_MODEL_PATH))
    assert library.manifest["learn_defaults"] == shipped["learn"]
    assert library.manifest["calibration_prompts"] == shipped["calibration_prompts"]
    assert len(shipped["calibration_prompts"]) == 20
    # a local folder of the same name wins over the shipped name
    (tmp_path / "tiny-world").mkdir()
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert resolve_model("tiny-world") == "tiny-world"
    finally:
        os.chdir(cwd)


def test_learn_settings_layer_the_defaults_the_method_and_the_flags():
    from cns import LearnConfig
    from cns.errors import CNSError
    from cns.model_settings import METHOD_PRESETS, learn_settings

    defaults = LearnConfig(steps=150, lambda_keep=5.0, lambda_generic=1.0, lr_neurons=0.02)
    assert learn_settings(defaults) == defaults and learn_settings(defaults, "default") == defaults
    paper = learn_settings(defaults, "paper", {"steps": 7})
    assert (paper.lambda_keep, paper.lambda_generic, paper.steps, paper.lr_neurons) == (0.0, 0.0, 7, 0.02)
    assert all(getattr(paper, k) == v for k, v in METHOD_PRESETS["paper"].items())
    assert learn_settings(defaults, "paper", {"lambda_keep": 3.0}).lambda_keep == 3.0  # a flag wins over the method
    assert defaults.lambda_keep == 5.0  # the defaults are not changed in place
    with pytest.raises(CNSError, match="unknown method 'papr'"):
        learn_settings(defaults, "papr")


def test_the_demo_learns_with_what_learn_does_without_flags(tmp_path):
    from cns.world.demo import DemoSettings, demo_learn_config

    library = ConceptLibrary.create(tmp_path / "lib", "tiny-world")
    shipped = library.default_config()
    assert shipped.lambda_generic > 0  # the tiny world recommends L_generic
    config = demo_learn_config(library, DemoSettings(seed=3))
    assert config == shipped.__class__(**{**shipped.to_dict(), "seed": 3})
    paper = demo_learn_config(library, DemoSettings(method="paper", learn={"steps": 2}))
    assert paper.lambda_generic == 0.0 and paper.steps == 2 and paper.lr_neurons == shipped.lr_neurons
