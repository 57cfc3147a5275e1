"""Shared fixtures: a tiny dummy Stable Diffusion pipeline saved as a diffusers folder, concept
image folders, and a library with concepts learned on it. Everything offline and on CPU."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from cns import ConceptLibrary, ConceptSpec, LearnConfig  # noqa: E402
from cns.testing import make_dummy_pipeline, write_dummy_images  # noqa: E402

torch.set_num_threads(1)

# Fast settings for the dummy model: enough steps that trained values move.
FAST = dict(steps=6, num_class_images=2, class_image_steps=2, lr_neurons=1e-2, lr_embedding=1e-2)


def fast_config(**overrides) -> LearnConfig:
    return LearnConfig(**{**FAST, **overrides})


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("dummy") / "base"
    make_dummy_pipeline(path)
    return path


@pytest.fixture(scope="session")
def concept_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    colors = [(200, 40, 40), (40, 40, 200), (40, 200, 40)]
    return [write_dummy_images(root / f"c{i}", count=3, seed=i + 1, color=c) for i, c in enumerate(colors)]


@pytest.fixture
def empty_library(tmp_path, base_model):
    return ConceptLibrary.create(tmp_path / "lib", str(base_model))


@pytest.fixture(scope="session")
def _three_concept_library(tmp_path_factory, base_model, concept_folders):
    """A library after three tasks, with a snapshot of the library after each task."""
    root = tmp_path_factory.mktemp("three")
    library = ConceptLibrary.create(root / "lib", str(base_model))
    snapshots = []
    for folder, word in zip(concept_folders, ["dog", "hat", "cat"]):
        library.learn([ConceptSpec(folder, word)], fast_config(), progress=False)
        snapshot = root / f"after{len(snapshots) + 1}"
        shutil.copytree(library.path, snapshot)
        snapshots.append(snapshot)
    return library.path, snapshots


@pytest.fixture
def three_concept_library(_three_concept_library, tmp_path):
    """A private copy (tests may write to it) and the per-task snapshots (read only)."""
    path, snapshots = _three_concept_library
    copy = tmp_path / "lib"
    shutil.copytree(path, copy)
    return ConceptLibrary(copy), snapshots


@pytest.fixture(scope="session")
def _one_concept_library(tmp_path_factory, base_model, concept_folders):
    """A library holding <new1> (dog), learned once; tests use private copies (``lib``)."""
    library = ConceptLibrary.create(tmp_path_factory.mktemp("bad") / "lib", str(base_model))
    library.learn([ConceptSpec(concept_folders[0], "dog")], LearnConfig(steps=2, num_class_images=2, class_image_steps=2), progress=False)
    assert library.tokens == ["<new1>"]
    return library.path


@pytest.fixture
def lib(_one_concept_library, tmp_path) -> Path:
    """A private copy of a library holding <new1> (dog)."""
    copy = tmp_path / "lib"
    shutil.copytree(_one_concept_library, copy)
    return copy
