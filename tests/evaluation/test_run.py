"""The evaluation harness on the dummy pipeline: a 3-concept, 2-method micro-protocol (CNS and
Orthogonal Adaptation) run end to end, resumed, and its numbers checked by hand."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from cns.errors import CNSError
from cns.evaluation import run as run_module
from cns.evaluation.methods import METHODS
from cns.evaluation.run import run_evaluation, score_matrix

from .conftest import micro_protocol

MICRO_METHODS = ("cns", "ortho")


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, base_model, tiny_scorer, dummy_concepts, dummy_zero_shot):
    out = tmp_path_factory.mktemp("micro") / "eval"
    results = run_evaluation(micro_protocol(), str(base_model), tiny_scorer, out, methods=MICRO_METHODS,
                             concepts=dummy_concepts, zero_shot=dummy_zero_shot, progress=False)
    return out, results


def test_score_matrix_is_lower_triangular(micro_run):
    out, results = micro_run
    stored = json.loads((out / "results.json").read_text())
    for key in MICRO_METHODS:
        method = stored["sets"][0]["methods"][key]
        for name in ("clip_i_mean", "clip_i_best", "clip_t_mean", "clip_t_best"):
            m = score_matrix(method, name)
            assert m.shape == (3, 3)
            for j in range(3):
                for i in range(3):
                    assert math.isnan(m[j, i]) == (i > j), (key, name, j, i)
        # best of N is at least the mean of the same prompts
        assert np.all(score_matrix(method, "clip_i_best")[np.tril_indices(3)]
                      >= score_matrix(method, "clip_i_mean")[np.tril_indices(3)] - 1e-9)


def test_continual_summaries_match_hand_computation(micro_run):
    _, results = micro_run
    for key in MICRO_METHODS:
        a = score_matrix(results["sets"][0]["methods"][key], "clip_i_mean")
        a_t = (a[2, 0] + a[2, 1] + a[2, 2]) / 3
        f_t = (max(a[0, 0] - a[2, 0], a[1, 0] - a[2, 0]) + (a[1, 1] - a[2, 1])) / 2
        bwt = ((a[2, 0] - a[0, 0]) + (a[2, 1] - a[1, 1])) / 2
        row = results["summary"][key]
        assert row["A_T_mean"] == pytest.approx(a_t)
        assert row["F_T_mean"] == pytest.approx(f_t)
        assert row["BWT_mean"] == pytest.approx(bwt)
        assert row["single_clip_i_mean"] == pytest.approx(a_t)
        assert row["first_concept_curve"] == pytest.approx(list(a[:, 0]))


def test_outputs_are_written(micro_run):
    out, results = micro_run
    report = (out / "report.md").read_text()
    for text in ("Table 1", "Table 2", "A_T", "F_T", "BWT", "CNS", "Orthogonal Adaptation", "Zero-shot",
                 "images per prompt: 2", "CLIP conventions", "forgetting.png", "score_matrices.png"):
        assert text in report, text
    # the base model drew every single-concept prompt, token left out, with the methods' seeds
    base = results["sets"][0]["base_single_items"]
    prompts = results["sets"][0]["prompts"]
    assert [(r["concept"], r["prompt"]) for r in base] == [
        (int(i), " ".join(p.replace(f"<new{int(i) + 1}>", "").split())) for i in prompts for p in prompts[i]]
    assert all("<new" not in r["prompt"] and -1 <= r["clip_i"] <= 1 for r in base)
    for name in ("forgetting.png", "score_matrices.png", "grid_cns.png", "grid_ortho.png"):
        assert (out / name).stat().st_size > 0, name
    summary = results["summary"]
    assert summary["cns"]["combine_bytes"] == 0
    assert summary["ortho"]["combine_bytes"] > 0
    assert {"multi_clip_i_mean", "multi_clip_t_best", "zero_shot_clip_t", "zero_shot_attributes",
            "stored_bytes_per_concept", "train_seconds_per_concept"} <= set(summary["cns"])
    # attribute accuracy is a share of (image, attribute) pairs: 2 prompts x 2 images -> a multiple of 1/4
    color = results["base"]["zero_shot"]["attributes"]["color"]
    assert 0 <= color <= 1 and (color * 4) == round(color * 4)


def test_rerun_skips_finished_units(micro_run, base_model, tiny_scorer, dummy_concepts, dummy_zero_shot,
                                    monkeypatch):
    out, first = micro_run
    calls = {"learn": 0, "generate": 0}  # generate: jobs drawn (a prompt's images)
    original_draw = run_module._draw_jobs

    def counting_draw(*args, **kwargs):
        for drawn in original_draw(*args, **kwargs):
            calls["generate"] += 1
            yield drawn

    monkeypatch.setattr(run_module, "_draw_jobs", counting_draw)
    for cls in {METHODS[k] for k in MICRO_METHODS}:
        original_learn = cls.learn

        def counting_learn(self, task, _original=original_learn):
            calls["learn"] += 1
            return _original(self, task)

        monkeypatch.setattr(cls, "learn", counting_learn)

    again = run_evaluation(micro_protocol(), str(base_model), tiny_scorer, out, methods=MICRO_METHODS,
                           concepts=dummy_concepts, zero_shot=dummy_zero_shot, progress=False)
    assert calls == {"learn": 0, "generate": 0}
    assert again["summary"]["cns"]["A_T_mean"] == pytest.approx(first["summary"]["cns"]["A_T_mean"])

    # one unit removed: only it is redone (task 2 of CNS: concepts 1 and 2, 2 prompts each)
    # (the library now holds 3 tasks: W_2 is rebuilt from its first 2, and scores the same)
    unit = out / "set1" / "cns" / "eval" / "task_0002.json"
    before = json.loads(unit.read_text())["concepts"]
    unit.unlink()
    third = run_evaluation(micro_protocol(), str(base_model), tiny_scorer, out, methods=MICRO_METHODS,
                           concepts=dummy_concepts, zero_shot=dummy_zero_shot, progress=False)
    assert calls == {"learn": 0, "generate": 4}
    after = json.loads(unit.read_text())["concepts"]
    for i in ("0", "1"):
        assert after[i]["clip_i"] == pytest.approx(before[i]["clip_i"], abs=1e-5)
    assert third["summary"]["cns"]["A_T_mean"] == pytest.approx(first["summary"]["cns"]["A_T_mean"])

    # other settings in the same folder are refused
    with pytest.raises(CNSError, match="other settings"):
        run_evaluation(micro_protocol(steps=4), str(base_model), tiny_scorer, out, methods=MICRO_METHODS,
                       concepts=dummy_concepts, zero_shot=dummy_zero_shot, progress=False)


def test_a_long_run_scores_only_the_first_concept_until_the_last_task(tmp_path, base_model, tiny_scorer,
                                                                      dummy_concepts, dummy_zero_shot):
    from cns.evaluation.aggregate import aggregate

    protocol = micro_protocol(score_after_each_task="first", steps=2)
    results = run_evaluation(protocol, str(base_model), tiny_scorer, tmp_path / "eval", methods=("ti",),
                             concepts=dummy_concepts, zero_shot=dummy_zero_shot, progress=False)
    m = score_matrix(results["sets"][0]["methods"]["ti"])
    scored = ~np.isnan(m)
    assert scored[:, 0].all() and scored[-1].all()  # the first concept after every task; all after the last
    assert not scored[1, 1] and not scored[:-1, 1:].any()
    assert math.isnan(results["summary"]["ti"]["F_T_mean"])  # not measurable from this matrix
    items = aggregate([results], reference=None)["figures"]["ti"]
    assert items["first_concept_change"]["mean"] == pytest.approx(m[-1, 0] - m[0, 0])
    assert "F_T" not in items
    assert "scored after each task: the first concept" in "\n".join(results["settings"])


def test_finished_results_follow_the_model_contents_not_its_path(tmp_path):
    from cns.evaluation.run import _model_fingerprint, _same_model

    first = tmp_path / "install-a" / "model"
    (first / "unet").mkdir(parents=True)
    (first / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (first / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    stored = {"model": str(first), "model_fingerprint": _model_fingerprint(first)}
    moved = tmp_path / "install-b" / "model"
    shutil.copytree(first, moved)
    assert _same_model(stored, {"model": str(moved), "model_fingerprint": _model_fingerprint(moved)})
    # results written before fingerprints were recorded: the old folder, if still there, is fingerprinted
    assert _same_model({"model": str(first)}, {"model": str(moved), "model_fingerprint": _model_fingerprint(moved)})
    (moved / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"retrained")
    changed = {"model": str(moved), "model_fingerprint": _model_fingerprint(moved)}
    assert not _same_model(stored, changed)
    assert not _same_model({"model": str(moved), "model_fingerprint": stored["model_fingerprint"]}, changed)
    # a hub id: the id is all there is to compare
    assert _same_model({"model": "org/model"}, {"model": "org/model", "model_fingerprint": None})
    assert not _same_model({"model": "org/model"}, {"model": "org/other", "model_fingerprint": None})


def test_jobs_are_drawn_in_batches_across_prompts_with_each_images_own_noise(base_model, monkeypatch):
    """Batched across jobs, a job's images are the ones it draws alone (seed + offset + k), to
    float tolerance, whatever the chunk boundaries."""
    from cns.library import load_base_pipeline

    pipe = load_base_pipeline(str(base_model))
    pipe.set_progress_bar_config(disable=True)
    protocol = micro_protocol(sample_steps=2, seed=5)
    jobs = [{"prompt": "a photo of a dog", "n": 2}, {"prompt": "a red hat", "n": 3, "seed_offset": 1000},
            {"prompt": "a cat", "n": 1}, {"prompt": "a photo of a dog", "n": 2, "seed_offset": 7}]
    monkeypatch.setattr(run_module, "IMAGES_HELD", 4)  # chunks: jobs 0 | 1+2 | 3
    monkeypatch.setattr(run_module, "GENERATION_BATCH", 3)
    drawn = list(run_module._draw_jobs(pipe, list(enumerate(jobs)), protocol))
    assert [index for index, _, _ in drawn] == [0, 1, 2, 3]
    for index, job, images in drawn:
        alone = run_module.generate_images(pipe, job["prompt"], job["n"], protocol, job.get("seed_offset", 0))
        assert len(images) == job["n"]
        for a, b in zip(images, alone):
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2
    # the two "a photo of a dog" jobs differ only by their seeds: different images
    assert np.abs(np.asarray(drawn[0][2][0], dtype=int) - np.asarray(drawn[3][2][0], dtype=int)).max() > 10
