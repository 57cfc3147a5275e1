"""The K/V drift diagnosis against hand computation, and where the library records it."""

from __future__ import annotations

import json

import pytest
import torch

from cns import ConceptLibrary, ConceptSpec
from cns.diagnostics import drift_by_route, kv_outputs, relative_change

from .conftest import fast_config


def test_drift_by_route_splits_the_change_between_overlap_and_own_elements():
    before = {"k": torch.tensor([[1.0, 0.0], [0.0, 2.0]])}
    after = {"k": torch.tensor([[1.0, 3.0], [0.0, 2.0]]) + torch.tensor([[0.0, 0.0], [4.0, 0.0]])}
    states = torch.tensor([[1.0, 1.0]])  # outputs before: (1, 2), norm sqrt(5)
    earlier = {"k": torch.tensor([[False, True], [False, False]])}  # element (0, 1) was trained before
    report = drift_by_route(before, after, states, earlier)
    # dW c = (3, 4): |.| = 5; through the overlap (0, 1): (3, 0); through its own (1, 0): (0, 4)
    assert report["total"] == pytest.approx(5 / 5 ** 0.5)
    assert report["overlap"] == pytest.approx(3 / 5 ** 0.5)
    assert report["own"] == pytest.approx(4 / 5 ** 0.5)
    assert report["layers"]["k"] == pytest.approx(5 / 5 ** 0.5) and report["states"] == 1
    # a change orthogonal to every state moves nothing
    still = drift_by_route(before, {"k": before["k"] + torch.tensor([[1.0, -1.0], [2.0, -2.0]])}, states)
    assert still["total"] == 0.0 and "overlap" not in still


def test_relative_change_pools_layers_before_it_divides():
    w = {"a": torch.eye(2), "b": 3 * torch.eye(2)}
    moved = {"a": 2 * torch.eye(2), "b": 3 * torch.eye(2)}
    states = torch.tensor([[1.0, 0.0]])
    report = relative_change(kv_outputs(w, states), kv_outputs(moved, states))
    assert report["layers"] == {"a": 1.0, "b": 0.0}
    assert report["total"] == pytest.approx(1 / 10 ** 0.5)  # |(1, 0)| / |((1, 0), (3, 0))|


def test_each_task_records_how_far_it_moved_generic_prompts_and_earlier_tokens(tmp_path, base_model,
                                                                                concept_folders, capsys):
    library = ConceptLibrary.create(tmp_path / "lib", str(base_model))
    for folder, word in zip(concept_folders[:2], ["dog", "hat"]):
        library.learn([ConceptSpec(folder, word)], fast_config(), progress=False)
    first, second = (library.task_record(t)["drift"] for t in library.tasks)
    assert "earlier_tokens" not in first  # nothing came before it
    assert first["generic"]["total"] > 0 and first["generic"]["overlap"] == 0.0
    assert second["generic"]["total"] > 0 and second["earlier_tokens"]["total"] > 0
    assert second["generic"]["states"] > 0 and set(second["generic"]["layers"]) == set(library.base_model["layers"])
    # cns show lists them, per task
    from cns.cli import main

    assert main(["show", str(library.path)]) == 0
    shown = capsys.readouterr().out
    assert f"{100 * second['earlier_tokens']['total']:.1f}%" in shown
    assert main(["show", str(library.path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["concepts"][1]["drift"]["earlier_tokens"] == pytest.approx(second["earlier_tokens"]["total"])
