"""The promise check of the interval report, on hand-made figures."""

from __future__ import annotations

import numpy as np
import pytest

from cns.evaluation.aggregate import aggregate, promise_checks, run_items, write_interval_report
from cns.evaluation.intervals import bootstrap_interval, paired_differences


def _f(mean, low, high):
    return {"mean": mean, "low": low, "high": high, "n": 3, "items": 30, "level": 0.95}


def test_each_claim_is_kept_missed_or_not_resolved_by_its_interval():
    aggregated = {
        "methods": ["cns", "cns-paper", "c-lora", "ti"], "reference": "cns", "runs": 3,
        "labels": {"cns": "CNS", "cns-paper": "CNS paper", "c-lora": "C-LoRA", "ti": "TI"},
        "figures": {
            "cns": {"F_T": _f(0.004, 0.001, 0.008), "single_clip_t": _f(0.26, 0.25, 0.27)},
            "cns-paper": {"single_clip_t": _f(0.20, 0.19, 0.21)},
            "c-lora": {"single_clip_t": _f(0.28, 0.27, 0.29)},
            "ti": {"single_clip_t": _f(0.27, 0.26, 0.28)},
        },
        "vs_base": {"cns": {"zero_shot_clip_t": _f(0.001, -0.004, 0.006),
                            "zero_shot_attributes": _f(-0.02, -0.04, 0.001)}},
        "vs_reference": {
            "cns": {},
            "cns-paper": {"single_clip_i": _f(0.05, 0.02, 0.08)},  # not a peer: never checked
            "c-lora": {"single_clip_i": _f(-0.03, -0.05, -0.01), "single_clip_t": _f(0.02, 0.015, 0.025)},
            "ti": {"single_clip_i": _f(-0.01, -0.03, 0.01), "single_clip_t": _f(0.01, 0.0, 0.02)},
        },
    }
    checks = {claim: (measured, kept) for claim, measured, kept in promise_checks(aggregated)}
    assert checks["F_T <= 0.010"] == ("0.004 [0.001, 0.008]", "yes")
    assert checks["zero-shot CLIP-T within 0.010 of the base model"][1] == "yes"
    assert checks["zero-shot attribute accuracy within 0.010 of the base model"][1] == "not resolved"
    # the reference minus the peer, as the claim reads
    assert checks["single CLIP-I ahead of C-LoRA"] == ("+0.030 [+0.010, +0.050]", "yes")
    assert checks["single CLIP-I ahead of TI"][1] == "not resolved"
    assert not any("CNS paper" in claim for claim in checks)
    # the best peer on CLIP-T is C-LoRA, 0.02 [0.015, 0.025] ahead: a miss
    assert checks["single CLIP-T within 0.010 of the best peer (C-LoRA)"] == ("-0.020 [-0.025, -0.015]", "no")
    report = write_interval_report(dict(aggregated, first_concept_curve={}, base={}), "t")
    assert "## The promise, checked for CNS" in report and "| F_T <= 0.010 | 0.004 [0.001, 0.008] | yes |" in report


def _method_result(single_clip_i):
    """One method's result in one run: a 1-task score matrix and its single-concept items."""
    return {"matrices": {"clip_i_mean": [[float(np.mean(single_clip_i))]]},
            "single_items": [{"concept": 0, "prompt": f"p{k}", "clip_i": x, "clip_t": 0.2}
                             for k, x in enumerate(single_clip_i)]}


def _seed_results(seed, methods):
    return {"protocol": {"seed": seed}, "methods": list(methods), "labels": {m: m for m in methods},
            "sets": [{"methods": {m: _method_result(items) for m, items in methods.items()}}]}


def test_a_method_run_on_fewer_runs_is_paired_over_the_runs_both_have():
    runs = [_seed_results(0, {"cns": [0.30, 0.32, 0.34], "cns-random": [0.20, 0.25, 0.21]}),
            _seed_results(1, {"cns": [0.50, 0.52, 0.40]}),
            _seed_results(2, {"cns-noreg": [0.1, 0.1, 0.1]})]
    aggregated = aggregate(runs, reference="cns")
    assert aggregated["runs"] == 3
    assert aggregated["runs_per_method"] == {"cns": 2, "cns-random": 1, "cns-noreg": 1}
    expected = bootstrap_interval(paired_differences([[0.20, 0.25, 0.21]], [[0.30, 0.32, 0.34]]), seed=0)
    assert aggregated["vs_reference"]["cns-random"]["single_clip_i"] == expected.to_dict()
    assert aggregated["vs_reference"]["cns-random"]["single_clip_i"]["mean"] == pytest.approx(-0.10)
    # the reference's own figure uses both of its runs
    assert aggregated["figures"]["cns"]["single_clip_i"]["mean"] == pytest.approx(np.mean([0.32, 0.4733333]), abs=1e-6)
    # no run in common: no paired difference rather than a wrong one
    assert "single_clip_i" not in aggregated["vs_reference"]["cns-noreg"]
    report = write_interval_report(aggregated, "t")
    assert "| cns-random | 1 |" in report


def test_single_concept_items_also_come_per_kind_of_concept():
    result = _method_result([0.1, 0.2, 0.3, 0.4])
    for item, concept in zip(result["single_items"], (0, 0, 1, 2)):
        item["concept"] = concept
    items = run_items(result, kinds=["scene", "object", "scene"])
    assert items["single_clip_i@scene"] == [0.1, 0.2, 0.4] and items["single_clip_i@object"] == [0.3]
    assert "single_clip_i@style" not in items and items["single_clip_i"] == [0.1, 0.2, 0.3, 0.4]
    runs = [_seed_results(0, {"cns": [0.1, 0.2, 0.3, 0.4]})]
    runs[0]["sets"][0]["concepts"] = [{"kind": "scene"}, {"kind": "object"}, {"kind": "scene"}]
    for item, concept in zip(runs[0]["sets"][0]["methods"]["cns"]["single_items"], (0, 0, 1, 2)):
        item["concept"] = concept
    aggregated = aggregate(runs)
    assert aggregated["figures"]["cns"]["single_clip_i@object"]["mean"] == pytest.approx(0.3)
    assert aggregated["figures"]["cns"]["single_clip_i@scene"]["mean"] == pytest.approx(0.7 / 3)
    assert "| object | scene |" in write_interval_report(aggregated, "t")


def test_the_gain_over_the_base_model_is_paired_prompt_by_prompt():
    runs = [_seed_results(0, {"cns": [0.30, 0.40, 0.50]})]
    runs[0]["sets"][0]["base_single_items"] = [{"concept": 0, "prompt": f"p{k}", "clip_i": x, "clip_t": 0.1}
                                               for k, x in enumerate([0.25, 0.30, 0.50])]
    aggregated = aggregate(runs)
    gain = aggregated["vs_base"]["cns"]["single_clip_i"]
    expected = bootstrap_interval(paired_differences([[0.30, 0.40, 0.50]], [[0.25, 0.30, 0.50]]), seed=0)
    assert gain == expected.to_dict() and gain["mean"] == pytest.approx(0.05)
    assert aggregated["base"]["single_clip_i"]["mean"] == pytest.approx(0.35)
    report = write_interval_report(aggregated, "t")
    assert "| base model (token left out) | 1 | 0.350" in report and "+0.050 [" in report


def test_a_single_value_is_shown_without_an_interval():
    from cns.evaluation.aggregate import _cell

    assert _cell({"mean": -0.005, "low": -0.005, "high": -0.005, "n": 1, "items": 1}, True) == "-0.005 (one value)"
    assert _cell(_f(0.2, 0.1, 0.3)) == "0.200 [0.100, 0.300]"
