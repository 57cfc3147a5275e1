"""The promise check of the interval report, on hand-made figures."""

from __future__ import annotations

from cns.evaluation.aggregate import promise_checks, write_interval_report


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
