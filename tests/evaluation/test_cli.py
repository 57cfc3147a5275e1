"""``cns evaluate`` (through ``cns.evaluation.cli``) on the dummy pipeline with tiny-world
concepts, and the same run sharded over 2 CPU processes with ``accelerate launch``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cns.evaluation.cli import main, protocol_from_args, register

TINY = ["--sets", "1", "--concepts", "2", "--prompts", "1", "--multi", "1", "--images", "2", "--zero-shot", "1",
        "--steps", "2", "--batch-size", "1", "--sample-steps", "2", "--class-images", "1", "--quiet"]


def _args(base_model, tiny_clip_path, out, methods=("cns", "ti")):
    return ["--model", str(base_model), "--evaluator", str(tiny_clip_path), "--out", str(out),
            "--methods", *methods, *TINY]


def test_register_adds_evaluate_with_every_setting():
    parser = argparse.ArgumentParser(prog="cns")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["evaluate", "--preset", "paper", "--sets", "2", "--images", "7", "--clip-scale", "2.5",
                              "--clip-at-zero", "--text-prefix", "A photo depicts "])
    assert args.func.__name__ == "run_from_args"
    protocol = protocol_from_args(args)
    assert len(protocol.sets) == 2 and all(len(s) == 7 for s in protocol.sets)
    assert protocol.images_per_prompt == 7 and protocol.single_prompts_per_concept == 5
    assert protocol.clip_scale == 2.5 and protocol.clip_at_zero and protocol.text_prefix == "A photo depicts "
    paper = protocol_from_args(parser.parse_args(["evaluate", "--preset", "paper"]))
    assert paper.images_per_prompt == 50 and paper.multi_prompts_per_set == 7 and len(paper.sets) == 3
    assert all(len(s) * paper.single_prompts_per_concept == 35 for s in paper.sets)
    standard = protocol_from_args(parser.parse_args(["evaluate", "--preset", "standard"]))
    assert len(standard.sets) == 3 and standard.zero_shot_prompts >= 48 and standard.multi_prompts_per_set >= 6
    long = protocol_from_args(parser.parse_args(["evaluate", "--preset", "long"]))
    from cns.world.concepts import CONCEPTS

    assert sorted(long.sets[0]) == sorted(c.name for c in CONCEPTS) and long.score_after_each_task == "first"


def test_cli_runs_the_tiny_world_protocol_on_the_dummy_model(tmp_path, world_words_model, tiny_clip_path, capsys):
    base_model = world_words_model
    out = tmp_path / "eval"
    assert main(_args(base_model, tiny_clip_path, out)) == 0
    printed = capsys.readouterr().out
    assert "CNS" in printed and "Textual Inversion" in printed and "report.md" in printed
    results = json.loads((out / "results.json").read_text())
    assert [c["name"] for c in results["sets"][0]["concepts"]] == ["berry-heart", "starry-night"]
    assert (out / "concepts" / "berry-heart" / "captions.json").is_file()
    assert results["summary"]["ti"]["combine_bytes"] == 0
    assert "set 1: berry-heart -> starry-night" in (out / "report.md").read_text()
    # other settings in the same folder: a one-line error, not a traceback
    assert main(_args(base_model, tiny_clip_path, out)[:-1] + ["--steps", "3", "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_seeds_run_one_folder_each_and_report_every_figure_with_its_interval(tmp_path, world_words_model,
                                                                             tiny_clip_path, capsys):
    out = tmp_path / "eval"
    args = _args(world_words_model, tiny_clip_path, out, methods=("cns", "ti", "cns:lambda_generic=10"))
    args[args.index("--zero-shot") + 1] = "2"
    assert main([*args, "--seeds", "0", "1"]) == 0
    assert "report.md" in capsys.readouterr().out
    runs = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert [json.loads((out / f"seed-{s}" / "protocol.json").read_text())["protocol"]["seed"] for s in (0, 1)] == [0, 1]
    aggregated = json.loads((out / "intervals.json").read_text())["aggregate"]
    assert aggregated["runs"] == 2 and aggregated["reference"] == "cns"
    assert aggregated["labels"]["cns:lambda_generic=10"] == "CNS (cns's default) [lambda_generic=10]"
    for key in ("cns", "ti"):
        figure = aggregated["figures"][key]["single_clip_i"]
        # the mean of the runs' means: each seed's own summary, averaged
        assert figure["mean"] == pytest.approx(np.mean([r["summary"][key]["single_clip_i_mean"] for r in runs]))
        assert figure["low"] <= figure["mean"] <= figure["high"] and figure["n"] == 2
        zero_shot = aggregated["vs_base"][key]["zero_shot_clip_t"]
        expected = np.mean([r["summary"][key]["zero_shot_clip_t"] - r["base"]["zero_shot"]["clip_t"] for r in runs])
        assert zero_shot["mean"] == pytest.approx(expected)
    assert "single_clip_i" in aggregated["vs_reference"]["ti"] and aggregated["vs_reference"]["cns"] == {}
    # the diagnosis: Textual Inversion leaves every K/V weight alone, CNS moves generic prompts' K/V a little
    assert aggregated["figures"]["ti"]["generic_kv_change"]["mean"] == 0.0
    assert 0 < aggregated["figures"]["cns"]["generic_kv_change"]["mean"] < 1
    report = (out / "report.md").read_text()
    assert "## Paired difference from CNS" in report and "seeds: 0 1" in report and "--seeds 0 1" in report
    # resumed: nothing is redone, the same figures come back
    assert main([*args, "--seeds", "0", "1"]) == 0
    assert json.loads((out / "intervals.json").read_text())["aggregate"]["figures"] == aggregated["figures"]
    # --report-only trains nothing: an unrun method is left out, the finished ones come back unchanged
    only = _args(world_words_model, tiny_clip_path, out, methods=("cns", "ti", "kv-all"))
    only[only.index("--zero-shot") + 1] = "2"
    assert main([*only, "--seeds", "0", "1", "2", "--report-only"]) == 0  # seed 2 never ran: left out
    reported = json.loads((out / "intervals.json").read_text())["aggregate"]
    assert reported["methods"] == ["cns", "ti"] and not (out / "seed-0" / "set1" / "kv-all").exists()
    assert reported["figures"]["ti"] == aggregated["figures"]["ti"] and reported["runs"] == 2
    assert reported["labels"] == {"cns": aggregated["labels"]["cns"], "ti": "Textual Inversion"}
    assert main([*only, "--seeds", "0", "--report-only", "--out", str(tmp_path / "empty")]) == 2
    assert "no finished runs" in capsys.readouterr().err and not (tmp_path / "empty").exists()


def test_cli_refuses_a_missing_model_in_one_line(tmp_path, tiny_clip_path, capsys):
    out = tmp_path / "eval"
    assert main(_args(tmp_path / "no-such-model", tiny_clip_path, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_shard_generation_and_agree_with_one(tmp_path, world_words_model, tiny_clip_path):
    base_model = world_words_model
    """accelerate launch with 2 CPU processes: the same numbers as one process."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not on PATH")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main(_args(base_model, tiny_clip_path, single, methods=("cns",))) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29731", "-m", "cns.evaluation.cli",
               *_args(base_model, tiny_clip_path, sharded, methods=("cns",))]
    if __import__("torch").cuda.is_available():
        pytest.skip("this test shards over CPU processes")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a = json.loads((single / "results.json").read_text())["sets"][0]["methods"]["cns"]["matrices"]
    b = json.loads((sharded / "results.json").read_text())["sets"][0]["methods"]["cns"]["matrices"]
    for name in a:
        x = np.array(a[name], dtype=float)
        y = np.array(b[name], dtype=float)
        assert np.allclose(x, y, atol=1e-4, equal_nan=True), name
