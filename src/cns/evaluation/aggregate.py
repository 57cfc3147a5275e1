"""Figures over several continual runs (seeds x sets), each with its 95 % interval, and the
paired difference of every method from a reference method (the default CNS).

A run is one seed of one continual set; its items are prompts (single-concept prompts after
the last task, multi-concept prompts, zero-shot prompts) or the run itself (A_T, F_T, BWT).
Intervals come from :func:`cns.evaluation.intervals.bootstrap_interval` over runs and items.
Zero-shot figures are also given as the paired difference from the base model, prompt by
prompt (the base model drew the same prompts with the same seeds).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .intervals import Interval, bootstrap_interval, paired_differences
from .metrics import continual_or_nan
from .run import score_matrix

__all__ = ["METRICS", "single_items", "run_items", "aggregate", "promise_checks", "write_interval_report"]

# key -> (label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "single_clip_i": ("single CLIP-I", True),
    "single_clip_t": ("single CLIP-T", True),
    "multi_clip_i": ("multi CLIP-I", True),
    "multi_clip_t": ("multi CLIP-T", True),
    "A_T": ("A_T", True),
    "F_T": ("F_T", False),
    "first_concept_change": ("first concept's CLIP-I, last task minus first", True),
    "generic_kv_change": ("K/V change of held-out generic prompts", False),
    "zero_shot_clip_t": ("zero-shot CLIP-T", True),
    "zero_shot_attributes": ("zero-shot attribute accuracy", True),
}


KINDS = ("object", "creature", "scene", "style")


def single_items(single: Sequence[dict], kinds: Sequence[str] | None = None) -> dict[str, list[float | None]]:
    """Single-concept items ``{'concept', 'clip_i', 'clip_t'}`` per metric; with ``kinds`` (each
    concept's kind, in the set's order) also per kind of concept (``single_clip_i@scene``, ...)."""
    items = {"single_clip_i": [r["clip_i"] for r in single], "single_clip_t": [r["clip_t"] for r in single]}
    for kind in sorted(set(kinds or ()), key=lambda k: (KINDS + (k,)).index(k)):
        mine = [r for r in single if kinds[r["concept"]] == kind]
        items[f"single_clip_i@{kind}"] = [r["clip_i"] for r in mine]
        items[f"single_clip_t@{kind}"] = [r["clip_t"] for r in mine]
    return items


def run_items(method_result: dict, kinds: Sequence[str] | None = None) -> dict[str, list[float | None]]:
    """The items of one method in one run, per metric (empty where the run lacks them); the
    single-concept ones also per kind of concept when ``kinds`` are given (:func:`single_items`)."""
    items = single_items(method_result.get("single_items") or [], kinds)
    multi = (method_result.get("multi") or {}).get("prompts") or []
    items["multi_clip_i"] = [r["clip_i"]["mean"] for r in multi]
    items["multi_clip_t"] = [r["clip_t"]["mean"] for r in multi]
    matrix = score_matrix(method_result)
    summary = continual_or_nan(matrix)
    items["A_T"], items["F_T"] = [summary["average"]], [summary["forgetting"]]
    items["first_concept_change"] = [float(matrix[-1, 0] - matrix[0, 0])]
    items["generic_kv_change"] = list((method_result.get("generic_kv_change") or [None])[-1:])
    zero_shot = method_result.get("zero_shot_per_prompt") or []
    items["zero_shot_clip_t"] = [r["clip_t"] for r in zero_shot]
    items["zero_shot_attributes"] = [r["attributes"] for r in zero_shot]
    return items


def _base_items(base_per_prompt) -> dict[str, list[float | None]]:
    rows = base_per_prompt or []
    return {"zero_shot_clip_t": [r["clip_t"] for r in rows], "zero_shot_attributes": [r["attributes"] for r in rows]}


def aggregate(runs: Sequence[dict], reference: str | None = "cns", seed: int = 0) -> dict:
    """``runs``: results of :func:`cns.evaluation.run.run_evaluation`, one per seed; every set of
    every seed is one cluster. Returns per method and metric its interval, its paired
    difference from ``reference`` (when that method ran), and for zero-shot metrics its paired
    difference from the base model; plus the first concept's mean CLIP-I curve and the base
    model's own zero-shot intervals. A method that ran on fewer runs than another is paired
    with it over the runs both have (``runs_per_method`` says how many each has)."""
    methods: list[str] = []
    labels: dict[str, str] = {}
    clusters: dict[str, dict[str, dict]] = {}  # method -> metric -> run id -> items
    base_clusters: dict[str, dict] = {}
    curves: dict[str, list] = {}
    for position, results in enumerate(runs):
        labels.update(results.get("labels", {}))
        run_seed = (results.get("protocol") or {}).get("seed", position)
        base = _base_items(results.get("base", {}).get("zero_shot_per_prompt"))
        for set_index, set_result in enumerate(results["sets"]):
            run_id = (run_seed, set_index)
            kinds = [c.get("kind", "") for c in set_result.get("concepts", [])] or None
            # the base model on the same single-concept prompts, the token left out
            base_single = single_items(set_result["base_single_items"], kinds) \
                if set_result.get("base_single_items") else {}
            for metric, values in {**base, **base_single}.items():
                base_clusters.setdefault(metric, {})[run_id] = values
            for key in results["methods"]:
                if key not in set_result["methods"]:
                    continue
                if key not in methods:
                    methods.append(key)
                method_result = set_result["methods"][key]
                for metric, values in run_items(method_result, kinds).items():
                    clusters.setdefault(key, {}).setdefault(metric, {})[run_id] = values
                curves.setdefault(key, []).append(score_matrix(method_result)[:, 0])
    out: dict = {"methods": methods, "labels": {k: labels.get(k, k) for k in methods}, "reference": None,
                 "runs": sum(len(r["sets"]) for r in runs), "runs_per_method": {}, "figures": {},
                 "vs_reference": {}, "vs_base": {}, "base": {}, "first_concept_curve": {}}
    if reference in methods:
        out["reference"] = reference
    for metric, values in base_clusters.items():
        interval = bootstrap_interval(list(values.values()), seed=seed)
        if interval is not None:
            out["base"][metric] = interval.to_dict()
    for key in methods:
        figures, versus, versus_base = {}, {}, {}
        out["runs_per_method"][key] = max(len(v) for v in clusters[key].values())
        for metric, values in clusters[key].items():
            interval = bootstrap_interval(list(values.values()), seed=seed)
            if interval is None:
                continue
            figures[metric] = interval.to_dict()
            if out["reference"] and key != out["reference"]:
                diff = _paired(values, clusters[out["reference"]].get(metric), seed)
                if diff is not None:
                    versus[metric] = diff.to_dict()
            if metric in base_clusters:
                diff = _paired(values, base_clusters[metric], seed)
                if diff is not None:
                    versus_base[metric] = diff.to_dict()
        out["figures"][key], out["vs_reference"][key], out["vs_base"][key] = figures, versus, versus_base
        lengths = {len(c) for c in curves[key]}
        if len(lengths) == 1:
            out["first_concept_curve"][key] = np.nanmean(np.stack(curves[key]), axis=0).tolist()
    return out


def _paired(a: dict, b: dict | None, seed: int) -> Interval | None:
    """Paired differences a - b over the runs both have; None where no run pairs item by item."""
    if not b:
        return None
    shared = [run for run in a if run in b]
    if not shared or any(len(a[run]) != len(b[run]) for run in shared):
        return None
    return bootstrap_interval(paired_differences([a[run] for run in shared], [b[run] for run in shared]), seed=seed)


PEER_PREFIXES = ("cns", "kv-all")  # CNS, its variants and ablations: not peers


def promise_checks(aggregated: dict, tolerance: float = 0.010) -> list[tuple[str, str, str]]:
    """(claim, what was measured, kept?) for the reference method: F_T at most ``tolerance``;
    zero-shot CLIP-T and attribute accuracy within ``tolerance`` of the base model (the paired
    interval inside ±tolerance); single and multi CLIP-I ahead of every peer (the paired
    interval above 0); single and multi CLIP-T within ``tolerance`` of the best peer."""
    reference = aggregated.get("reference")
    if not reference:
        return []
    figures, labels = aggregated["figures"], aggregated["labels"]
    peers = [k for k in aggregated["methods"] if not k.startswith(PEER_PREFIXES)]
    out = []
    f_t = figures[reference].get("F_T")
    if f_t:
        out.append((f"F_T <= {tolerance:.3f}", _cell(f_t), _verdict(f_t["high"] <= tolerance, f_t["low"] > tolerance)))
    for metric in ("zero_shot_clip_t", "zero_shot_attributes"):
        d = aggregated["vs_base"][reference].get(metric)
        if d:
            out.append((f"{METRICS[metric][0]} within {tolerance:.3f} of the base model", _cell(d, True),
                        _verdict(-tolerance <= d["low"] and d["high"] <= tolerance,
                                 d["high"] < -tolerance or d["low"] > tolerance)))
    for metric in ("single_clip_i", "multi_clip_i"):
        for peer in peers:
            d = aggregated["vs_reference"][peer].get(metric)
            if d:  # peer minus reference: the reference is ahead when the whole interval is below 0
                out.append((f"{METRICS[metric][0]} ahead of {labels[peer]}", _cell(_negated(d), True),
                            _verdict(d["high"] < 0, d["low"] > 0)))
    for metric in ("single_clip_t", "multi_clip_t"):
        scored = [p for p in peers if metric in figures[p]]
        if scored and metric in figures[reference]:
            best = max(scored, key=lambda p: figures[p][metric]["mean"])
            d = aggregated["vs_reference"][best].get(metric)
            if d:
                out.append((f"{METRICS[metric][0]} within {tolerance:.3f} of the best peer ({labels[best]})",
                            _cell(_negated(d), True), _verdict(d["high"] <= tolerance, d["low"] > tolerance)))
    return out


def _negated(d: dict) -> dict:
    return dict(d, mean=-d["mean"], low=-d["high"], high=-d["low"])


def _verdict(kept: bool, missed: bool) -> str:
    return "yes" if kept else "no" if missed else "not resolved"


def _cell(figure: dict | None, signed: bool = False) -> str:
    if not figure:
        return "–"
    sign = "+" if signed else ""
    if figure.get("items") == 1:  # one value: no interval to give
        return f"{figure['mean']:{sign}.3f} (one value)"
    return f"{figure['mean']:{sign}.3f} [{figure['low']:{sign}.3f}, {figure['high']:{sign}.3f}]"


def write_interval_report(aggregated: dict, title: str, settings: Sequence[str] = (), command: str = "") -> str:
    """Markdown: every figure with its 95 % interval, the paired differences from the
    reference method and, for zero-shot figures, from the base model."""
    labels, methods = aggregated["labels"], aggregated["methods"]
    lines = [f"# {title}", ""]
    if command:
        lines += ["Made by", "", f"    {command}", ""]
    lines += [f"Continual runs (seeds x sets): {aggregated['runs']}. Every figure: mean [95 % interval], a two-level "
              "bootstrap over runs and, within each run, its prompts (`cns.evaluation.intervals`).", ""]
    checks = promise_checks(aggregated)
    if checks:
        lines += [f"## The promise, checked for {labels[aggregated['reference']]}", "",
                  "| claim | measured | kept |", "|---|---|---|"]
        lines += [f"| {claim} | {measured} | {kept} |" for claim, measured, kept in checks]
        lines.append("")
    if settings:
        lines += ["## Settings", ""] + [f"- {s}" for s in settings] + [""]
    columns = ["single_clip_i", "single_clip_t", "multi_clip_i", "multi_clip_t", "F_T", "first_concept_change"]
    runs = aggregated.get("runs_per_method", {})
    base = aggregated.get("base", {})
    gained = "single_clip_i" in base
    lines += ["## Personalization and forgetting", ""]
    if gained:
        lines += ["Gain: single CLIP-I minus the base model's on the same prompts with the token left out "
                  "(paired, prompt by prompt): what the method learned beyond drawing the class word.", ""]
    lines += ["| method | runs | " + " | ".join(METRICS[c][0] for c in columns) + (" | gain |" if gained else " |"),
              "|---|---|" + "---|" * (len(columns) + gained)]
    if gained:
        lines.append(f"| base model (token left out) | {aggregated['runs']} | " + " | ".join(
            _cell(base.get(c)) if c in ("single_clip_i", "single_clip_t") else "–" for c in columns) + " | – |")
    for key in methods:
        gain = f" {_cell(aggregated['vs_base'][key].get('single_clip_i'), True)} |" if gained else ""
        lines.append(f"| {labels[key]} | {runs.get(key, aggregated['runs'])} | "
                     + " | ".join(_cell(aggregated["figures"][key].get(c)) for c in columns) + " |" + gain)
    zs = ["zero_shot_clip_t", "zero_shot_attributes"]
    if zs[0] in base:
        lines += ["", "## Zero-shot preservation (held-out generic prompts; Δ: paired, prompt by prompt, vs the "
                  "base model)", "",
                  "K/V change: ||(W_T - W_0) C|| / ||W_0 C|| after the last task, C every position of the zero-shot "
                  "prompts: how far the method moved what generic prompts feed the UNet.", "",
                  "| method | CLIP-T | Δ CLIP-T | attribute accuracy | Δ attribute accuracy | K/V change |",
                  "|---|---|---|---|---|---|",
                  f"| base model | {_cell(base.get(zs[0]))} | – | {_cell(base.get(zs[1]))} | – | – |"]
        for key in methods:
            f, d = aggregated["figures"][key], aggregated["vs_base"][key]
            lines.append(f"| {labels[key]} | {_cell(f.get(zs[0]))} | {_cell(d.get(zs[0]), True)} | "
                         f"{_cell(f.get(zs[1]))} | {_cell(d.get(zs[1]), True)} | {_cell(f.get('generic_kv_change'))} |")
    reference = aggregated.get("reference")
    if reference:
        columns = ["single_clip_i", "single_clip_t", "multi_clip_i", "multi_clip_t", "F_T", "zero_shot_clip_t",
                   "zero_shot_attributes"]
        lines += ["", f"## Paired difference from {labels[reference]} (method minus reference)", "",
                  "Same runs, prompts and seeds (a method with fewer runs is paired over the runs both have): an "
                  "interval that excludes 0 is a difference these runs resolve.",
                  "", "| method | " + " | ".join(METRICS[c][0] for c in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for key in methods:
            if key == reference:
                continue
            d = aggregated["vs_reference"][key]
            lines.append(f"| {labels[key]} | " + " | ".join(_cell(d.get(c), True) for c in columns) + " |")
    kinds = [k for k in KINDS if any(f"single_clip_i@{k}" in aggregated["figures"][m] for m in methods)]
    if kinds:
        lines += ["", "## Single-concept CLIP-I / CLIP-T by kind of concept", "",
                  "| method | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        rows = [("base model (token left out)", base)] if f"single_clip_i@{kinds[0]}" in base else []
        rows += [(labels[key], aggregated["figures"][key]) for key in methods]
        for label, f in rows:
            lines.append(f"| {label} | " + " | ".join(
                f"{_cell(f.get(f'single_clip_i@{k}'))} / {f[f'single_clip_t@{k}']['mean']:.3f}"
                if f"single_clip_t@{k}" in f else "–" for k in kinds) + " |")
    curves = aggregated.get("first_concept_curve", {})
    if curves:
        lines += ["", "## The first concept's CLIP-I after each task (mean over runs)", ""]
        for key, curve in curves.items():
            lines.append(f"- {labels[key]}: " + " → ".join(f"{x:.3f}" for x in curve))
    return "\n".join(lines) + "\n"
