"""The evaluation runner: the paper's experiments (Sec. 5) for every method, side by side.

For each continual set and method: learn the concepts one per task; after task j draw the
single-concept prompts of every concept i <= j and score them (CLIP-I against the concept's
images, CLIP-T against the prompt) into score matrices ``a[j, i]`` (NaN above the diagonal);
after the last task draw the multi-concept prompts and the zero-shot prompts (generic prompts
naming no learned concept, compared with the base model). Each finished (method, task) unit is
saved and skipped on a rerun. Image generation and scoring are split across processes when
started with ``accelerate launch`` (``PartialState().split_between_processes``); learning runs
on the main process.

Outputs in ``out``: ``results.json`` (every number), ``report.md`` (tables shaped like the
paper's Tables 1 and 2, the continual summaries A_T / F_T / BWT, zero-shot preservation, every
setting), ``forgetting.png``, ``score_matrices.png`` and ``grid_<method>.png``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import CNSError
from ..storage import write_json_atomic
from .methods import ConceptTask, make_method, parse_variant
from .metrics import ClipScorer, continual_or_nan, cosine_matrix, prepare_prompt
from .protocol import EvalConcept, Protocol, multi_prompts, resolve_folder, single_prompts

__all__ = ["ZeroShotSet", "tiny_world_zero_shot", "run_evaluation", "summarize", "write_report", "DEFAULT_METHODS"]

DEFAULT_METHODS = ("cns", "cns-paper", "cns-random", "cns-noreg", "cns-keep", "kv-all", "ti", "c-lora", "ortho",
                   "mix-of-show")
ZERO_SHOT_IMAGES = 2  # images per zero-shot prompt


@dataclass
class ZeroShotSet:
    """Generic prompts naming no learned concept, with the true label of each attribute and the
    candidate (labels, prompts) of each attribute for zero-shot classification."""

    prompts: list[str]
    labels: list[dict[str, str]] = field(default_factory=list)
    candidates: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)


def tiny_world_zero_shot(n: int, seed: int = 0) -> ZeroShotSet:
    """Captions of fresh single-object tiny-world scenes (train split), labelled by attribute."""
    from cns.world.evaluator import ATTRIBUTE_LABELS, attribute_prompts, scene_attribute
    from cns.world.render import caption, sample_scene

    rng = np.random.default_rng([seed, 4242])
    scenes = [sample_scene(rng, "train", n_objects=1) for _ in range(n)]
    candidates = {a: tuple(list(x) for x in attribute_prompts(a)) for a in ATTRIBUTE_LABELS}
    return ZeroShotSet([caption(s) for s in scenes], [{a: scene_attribute(s, a) for a in ATTRIBUTE_LABELS}
                                                      for s in scenes], candidates)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _state():
    """accelerate's process state. Under ``accelerate launch`` with several processes on a
    machine without a GPU, the processes join as CPU workers (gloo)."""
    from accelerate import PartialState

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        return PartialState(cpu=True)
    return PartialState()


def _gather(items: list) -> list:
    from accelerate.utils import gather_object

    return gather_object(items)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def method_folder(key: str) -> str:
    """A method's folder name: its key, a variant's settings spelt with file-name characters."""
    return key.replace(":", "@").replace(",", "+")


def _kv_weights(pipe) -> dict:
    from ..model import cross_attention_kv_layers

    return {n: layer.weight.detach() for n, layer in cross_attention_kv_layers(pipe.unet).items()}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "x"


def generate_images(pipe, prompt: str, n: int, protocol: Protocol, seed_offset: int = 0):
    """The images every method draws for a prompt: seeds ``protocol.seed + k`` (k < n)."""
    from ..generate import generate_images as _generate

    return _generate(pipe, prompt, n=n, steps=protocol.sample_steps, guidance=protocol.guidance,
                     seed=protocol.seed + seed_offset, batch_size=min(8, max(1, n)))


GENERATION_BATCH = 8  # images per UNet batch, across prompts
IMAGES_HELD = 64  # images drawn before they are scored and let go


def _draw_jobs(pipe, part: list[tuple[int, dict]], protocol: Protocol):
    """Yields ``(index, job, images)``: each job's images, the same as
    :func:`generate_images` draws (seeds ``protocol.seed + seed_offset + k``), but batched across
    jobs, :data:`IMAGES_HELD` at most at a time."""
    from ..generate import generate_many

    def seed(job):
        return protocol.seed + job.get("seed_offset", 0)

    chunk: list[tuple[int, dict]] = []
    for position, (index, job) in enumerate(part):
        chunk.append((index, job))
        last = position == len(part) - 1
        if not last and sum(j["n"] for _, j in chunk) + part[position + 1][1]["n"] <= IMAGES_HELD:
            continue
        requests = [(j["prompt"], seed(j) + k) for _, j in chunk for k in range(j["n"])]
        images = generate_many(pipe, requests, steps=protocol.sample_steps, guidance=protocol.guidance,
                               batch_size=GENERATION_BATCH)
        start = 0
        for i, j in chunk:
            yield i, j, images[start:start + j["n"]]
            start += j["n"]
        chunk = []


def _load_references(folder: Path, size: int, n: int):
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:n]
    return [Image.open(p).convert("RGB").resize((size, size), Image.LANCZOS) for p in files]


def _per_image(cos: torch.Tensor, settings) -> torch.Tensor:
    return settings.apply(cos)


# ---------------------------------------------------------------------------
# Units: generation + scoring, sharded
# ---------------------------------------------------------------------------


def _score_jobs(pipe, jobs: list[dict], protocol: Protocol, scorer: ClipScorer, references: dict,
                token_to_class: dict, image_dir: Optional[Path]) -> list[dict]:
    """Each job: {'key', 'prompt', 'concepts': [reference names], 'n', 'save': bool}. Split
    across processes; returns every job's per-image scores (gathered, in job order)."""
    settings = protocol.clip
    state = _state()
    mine = []
    with state.split_between_processes(list(enumerate(jobs))) as part:
        for index, job, images in _draw_jobs(pipe, list(part), protocol):
            emb = scorer.image_embeddings(images)
            text = scorer.text_embeddings([prepare_prompt(job["prompt"], token_to_class, settings)])
            clip_t = _per_image(cosine_matrix(emb, text)[:, 0], settings)
            result = {"index": index, "key": job["key"], "prompt": job["prompt"], "clip_t": clip_t.tolist()}
            if job.get("concepts"):
                per_concept = [_per_image(cosine_matrix(emb, references[c]), settings).mean(dim=1)
                               for c in job["concepts"]]
                result["clip_i"] = torch.stack(per_concept).mean(dim=0).tolist()
            if job.get("attributes"):
                result["predicted"] = {}
                for attribute, (labels, text_emb) in job["attributes"].items():
                    idx = cosine_matrix(emb, text_emb).argmax(dim=1).tolist()
                    result["predicted"][attribute] = [labels[k] for k in idx]
            if job.get("save") and image_dir is not None:
                from ..generate import image_grid

                image_dir.mkdir(parents=True, exist_ok=True)
                image_grid(images[:4], cols=min(4, len(images))).save(image_dir / f"{job['key']}.png")
            mine.append(result)
    gathered = _gather(mine)
    return sorted(gathered, key=lambda r: r["index"])


def _summary_stats(values: Sequence[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "best": float(arr.max())}


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def _prepare_class_images(out: Path, model: str, prompts: Sequence[str], protocol: Protocol, device) -> dict:
    """Prior-preservation images per class prompt, drawn once by the base model (seeds 0..n-1)
    and shared by every method. Main process only."""
    from ..library import load_base_pipeline

    folders = {}
    pipe = None
    for prompt in prompts:
        folder = out / "class_images" / _slug(prompt)
        folders[prompt] = folder
        done = folder / "done.json"
        if done.is_file() and json.loads(done.read_text()).get("n", 0) >= protocol.num_class_images:
            continue
        if protocol.num_class_images == 0:
            folder.mkdir(parents=True, exist_ok=True)
            continue
        if pipe is None:
            pipe = load_base_pipeline(model)
            if device:
                pipe.to(device)
        folder.mkdir(parents=True, exist_ok=True)
        from ..generate import generate_images as _generate

        images = _generate(pipe, prompt, n=protocol.num_class_images, steps=protocol.sample_steps,
                           guidance=protocol.guidance, seed=100_000, batch_size=8)
        for k, image in enumerate(images):
            image.save(folder / f"{k:04d}.png")
        _write_json(done, {"prompt": prompt, "n": len(images)})
    return folders


def run_evaluation(
    protocol: Protocol,
    model: str,
    scorer: ClipScorer,
    out: str | Path,
    methods: Sequence[str] = DEFAULT_METHODS,
    concepts: Optional[dict[str, EvalConcept]] = None,
    zero_shot: Optional[ZeroShotSet] = None,
    device: Optional[str] = None,
    calibration_prompts: Optional[Sequence[str]] = None,
    progress: bool = True,
    finished_only: bool = False,
) -> dict:
    """Run (or resume) the protocol for ``methods``; returns the results (also written to
    ``out/results.json`` with ``report.md`` and the plots, by the main process).

    ``finished_only``: train and draw nothing; collect the methods whose every unit of a set is
    already in ``out`` (a method unfinished in a set is left out of that set)."""
    from ..library import load_base_pipeline

    out = Path(out)
    if finished_only and not (out / "protocol.json").is_file():
        raise CNSError(f"{out} has no finished runs to report")
    state = _state()
    if device is None and state.device.type != "cpu":
        device = str(state.device)  # this process's GPU (one per process under accelerate launch)
    started = time.perf_counter()
    for m in methods:
        try:
            parse_variant(m)
        except KeyError as exc:
            raise CNSError(str(exc.args[0])) from None
    if concepts is None:
        from .protocol import tiny_world_concepts

        concepts = tiny_world_concepts({n for s in protocol.sets for n in s})
    if zero_shot is None and protocol.zero_shot_prompts > 0:
        zero_shot = tiny_world_zero_shot(protocol.zero_shot_prompts, protocol.seed)

    def log(msg: str) -> None:
        if progress and state.is_main_process:
            print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    base_probe = load_base_pipeline(model)
    resolution = base_probe.unet.config.sample_size * base_probe.vae_scale_factor
    # the diagnosis: how far each method's K/V moved the held-out generic prompts from the base model
    generic_states = base_kv = None
    if zero_shot is not None:
        from ..diagnostics import kv_outputs
        from ..model import encode_prompts

        with torch.no_grad():
            generic_states = torch.cat(encode_prompts(base_probe.tokenizer, base_probe.text_encoder, zero_shot.prompts))
        base_kv = kv_outputs(_kv_weights(base_probe), generic_states)
    del base_probe

    # settings: a finished unit is reused only under the same training and sampling settings
    settings_path = out / "protocol.json"
    current = {"protocol": protocol.to_dict(), "model": str(model), "model_fingerprint": _model_fingerprint(model)}
    if state.is_main_process:
        if settings_path.is_file():
            stored = json.loads(settings_path.read_text())
            old = Protocol.from_dict(stored["protocol"])
            if old.training_signature() != protocol.training_signature() or \
                    old.sampling_signature() != protocol.sampling_signature() or not _same_model(stored, current):
                raise CNSError(f"{out} holds results made with other settings; use a new --out folder")
        _write_json(settings_path, current)
    state.wait_for_everyone()

    results: dict = {"sets": [], "base": {}}
    labels: dict[str, str] = {}
    zs_candidates = {}
    if zero_shot is not None:
        zs_candidates = {a: (list(labels), scorer.text_embeddings(list(prompts)))
                         for a, (labels, prompts) in zero_shot.candidates.items()}

    def zero_shot_jobs():
        return [{"key": f"zs{k:03d}", "prompt": p, "concepts": [], "n": ZERO_SHOT_IMAGES, "seed_offset": 1000 * k,
                 "attributes": zs_candidates} for k, p in enumerate(zero_shot.prompts)]

    def zero_shot_summary(scored: list[dict]) -> dict:
        clip_t = [v for r in scored for v in r["clip_t"]]
        summary = {"clip_t": float(np.mean(clip_t)), "attributes": {}}
        for attribute in zs_candidates:
            hits = [pred == zero_shot.labels[k][attribute]
                    for k, r in enumerate(scored) for pred in r["predicted"][attribute]]
            summary["attributes"][attribute] = float(np.mean(hits))
        if summary["attributes"]:
            summary["attribute_mean"] = float(np.mean(list(summary["attributes"].values())))
        return summary

    def zero_shot_per_prompt(scored: list[dict]) -> list[dict]:
        """Per prompt: CLIP-T (mean over its images) and the share of its (image, attribute)
        pairs the evaluator reads right: the units of the intervals."""
        items = []
        for k, r in enumerate(scored):
            hits = [pred == zero_shot.labels[k][a] for a in zs_candidates for pred in r["predicted"][a]]
            items.append({"prompt": r["prompt"], "clip_t": float(np.mean(r["clip_t"])),
                          "attributes": float(np.mean(hits)) if hits else None})
        return items

    # --- the base model's zero-shot figures (once) ---
    if zero_shot is not None:
        path = out / "base" / "zero_shot.json"
        if finished_only and not path.is_file():
            raise CNSError(f"{out} has no finished runs to report (no {path.relative_to(out)})")
        if not path.is_file():
            log("base model: zero-shot prompts")
            pipe = load_base_pipeline(model)
            if device:
                pipe.to(device)
            scored = _score_jobs(pipe, zero_shot_jobs(), protocol, scorer, {}, {}, None)
            if state.is_main_process:
                _write_json(path, {"summary": zero_shot_summary(scored), "prompts": zero_shot.prompts,
                                   "per_prompt": zero_shot_per_prompt(scored)})
            state.wait_for_everyone()
        stored = json.loads(path.read_text())
        results["base"]["zero_shot"] = stored["summary"]
        results["base"]["zero_shot_per_prompt"] = stored.get("per_prompt")

    for set_index, names in enumerate(protocol.sets):
        set_dir = out / f"set{set_index + 1}"
        set_concepts = [concepts[n] for n in names]
        if state.is_main_process:
            folders = [resolve_folder(c, out / "concepts", protocol.reference_images, protocol.seed)
                       for c in set_concepts]
        state.wait_for_everyone()
        folders = [resolve_folder(c, out / "concepts", protocol.reference_images, protocol.seed)
                   for c in set_concepts]
        class_prompts = [c.class_prompt or protocol.class_prompts[c.kind].format(word=c.class_word)
                         for c in set_concepts]
        if state.is_main_process and not finished_only:
            _prepare_class_images(out, model, sorted(set(class_prompts)), protocol, device)
        state.wait_for_everyone()
        tasks = [ConceptTask(index=j, name=c.name, kind=c.kind, class_word=c.class_word, token=f"<new{j + 1}>",
                             folder=str(f), class_prompt=cp, class_folder=str(out / "class_images" / _slug(cp)))
                 for j, (c, f, cp) in enumerate(zip(set_concepts, folders, class_prompts))]
        tokens = [t.token for t in tasks]
        token_to_class = {t.token: t.class_word for t in tasks}
        references = {c.name: scorer.image_embeddings(_load_references(f, resolution, protocol.reference_images))
                      for c, f in zip(set_concepts, folders)}
        prompts = {t.index: single_prompts(protocol, c, t.token) for t, c in zip(tasks, set_concepts)}
        multi = multi_prompts(protocol, set_concepts, tokens)
        set_result = {"concepts": [t.to_dict() for t in tasks], "prompts": prompts,
                      "multi_prompts": [{"prompt": p, "concepts": [names[i] for i in idx]} for p, idx in multi],
                      "methods": {}}

        # the base model on the single-concept prompts with the token left out: what each
        # method's single-concept figures gain over drawing the class word alone
        unit = set_dir / "base" / "single.json"
        if not unit.is_file() and not finished_only:
            log(f"set {set_index + 1} base model: single-concept prompts without the token")
            pipe = load_base_pipeline(model)
            if device:
                pipe.to(device)
            concept_of_job = [i for i in range(len(tasks)) for _ in prompts[i]]
            jobs = [{"key": f"base-c{i + 1}-p{k + 1}", "prompt": " ".join(p.replace(tasks[i].token, "").split()),
                     "concepts": [tasks[i].name], "n": protocol.images_per_prompt}
                    for i in range(len(tasks)) for k, p in enumerate(prompts[i])]
            scored = _score_jobs(pipe, jobs, protocol, scorer, references, token_to_class, None)  # in job order
            if state.is_main_process:
                _write_json(unit, {"single_items": [
                    {"concept": i, "prompt": r["prompt"], "clip_i": float(np.mean(r["clip_i"])),
                     "clip_t": float(np.mean(r["clip_t"]))} for i, r in zip(concept_of_job, scored)]})
            state.wait_for_everyone()
            del pipe
        if unit.is_file():
            set_result["base_single_items"] = json.loads(unit.read_text())["single_items"]

        for key in methods:
            method_dir = set_dir / method_folder(key)
            if finished_only and not _finished(method_dir / "eval", len(tasks), bool(multi), zero_shot is not None):
                continue
            method = make_method(key, method_dir, model, protocol, device=device,
                                 calibration_prompts=calibration_prompts)
            labels[key] = method.label
            eval_dir = method_dir / "eval"
            image_dir = method_dir / "images"
            last = len(tasks) - 1
            for j, task in enumerate(tasks):
                if state.is_main_process and method.learned() <= j:
                    log(f"set {set_index + 1} {key}: learning task {j + 1}/{len(tasks)} ({task.name})")
                    method.learn(task)
                state.wait_for_everyone()
                unit = eval_dir / f"task_{j + 1:04d}.json"
                if unit.is_file():
                    continue
                log(f"set {set_index + 1} {key}: scoring after task {j + 1}")
                pipe, combine = method.build(tasks[: j + 1])
                scored_concepts = range(j + 1) if protocol.score_after_each_task == "all" or j == last else [0]
                jobs = [{"key": f"t{j + 1}-c{i + 1}-p{k + 1}", "prompt": p, "concepts": [tasks[i].name],
                         "n": protocol.images_per_prompt, "save": j == last and k == 0}
                        for i in scored_concepts for k, p in enumerate(prompts[i])]
                scored = _score_jobs(pipe, jobs, protocol, scorer, references, token_to_class, image_dir)
                drift = None
                if generic_states is not None:
                    from ..diagnostics import kv_outputs, relative_change

                    drift = relative_change(base_kv, kv_outputs(_kv_weights(pipe), generic_states))
                if state.is_main_process:
                    per_concept = {}
                    for i in scored_concepts:
                        rows = [r for r in scored if r["key"].startswith(f"t{j + 1}-c{i + 1}-")]
                        per_concept[str(i)] = {
                            "clip_i": _mean_of_prompts(rows, "clip_i"), "clip_t": _mean_of_prompts(rows, "clip_t"),
                            "prompts": rows,
                        }
                    _write_json(unit, {"task": j + 1, "combine": combine, "concepts": per_concept,
                                       "generic_kv_change": drift})
                state.wait_for_everyone()
                del pipe
            # --- after the last task: multi-concept prompts and zero-shot preservation ---
            unit = eval_dir / "multi.json"
            if multi and not unit.is_file():
                log(f"set {set_index + 1} {key}: multi-concept prompts")
                pipe, combine = method.build(tasks)
                jobs = [{"key": f"multi{k + 1}", "prompt": p, "concepts": [names[i] for i in idx],
                         "n": protocol.images_per_prompt, "save": True} for k, (p, idx) in enumerate(multi)]
                scored = _score_jobs(pipe, jobs, protocol, scorer, references, token_to_class, image_dir)
                if state.is_main_process:
                    _write_json(unit, {"combine": combine, "prompts": scored,
                                       "clip_i": _mean_of_prompts(scored, "clip_i"),
                                       "clip_t": _mean_of_prompts(scored, "clip_t")})
                state.wait_for_everyone()
            unit_zs = eval_dir / "zero_shot.json"
            if zero_shot is not None and not unit_zs.is_file():
                log(f"set {set_index + 1} {key}: zero-shot prompts")
                pipe, _ = method.build(tasks)
                scored = _score_jobs(pipe, zero_shot_jobs(), protocol, scorer, {}, token_to_class, None)
                if state.is_main_process:
                    _write_json(unit_zs, {"summary": zero_shot_summary(scored), "per_prompt": zero_shot_per_prompt(scored)})
                state.wait_for_everyone()
            set_result["methods"][key] = _collect_method(method, eval_dir, len(tasks))
        results["sets"].append(set_result)

    results["protocol"] = protocol.to_dict()
    results["settings"] = protocol.describe()
    results["model"] = str(model)
    results["methods"] = [m for m in methods if any(m in s["methods"] for s in results["sets"])]
    results["labels"] = {k: labels.get(k, k) for k in results["methods"]}
    results["summary"] = summarize(results)
    results["seconds"] = time.perf_counter() - started
    if state.is_main_process:
        _write_json(out / "results.json", results)
        write_report(out, results)
    state.wait_for_everyone()
    return results


def _model_fingerprint(model: str | Path) -> str | None:
    """A local model folder's content fingerprint; None for a hub id."""
    from ..storage import folder_fingerprint

    return folder_fingerprint(Path(model)) if Path(model).is_dir() else None


def _same_model(stored: dict, current: dict) -> bool:
    """The same base model: the same contents wherever the folder is now (results survive a
    reinstall or a moved folder), or, for a hub id, the same id."""
    before = stored.get("model_fingerprint") or (_model_fingerprint(stored["model"]) if stored.get("model") else None)
    if before and current["model_fingerprint"]:
        return before == current["model_fingerprint"]
    return stored.get("model") == current["model"]


def _finished(eval_dir: Path, n_tasks: int, multi: bool, zero_shot: bool) -> bool:
    """Whether a method's every unit of a set is written."""
    units = [f"task_{j + 1:04d}.json" for j in range(n_tasks)] + ["multi.json"] * multi + ["zero_shot.json"] * zero_shot
    return all((eval_dir / name).is_file() for name in units)


def _mean_of_prompts(rows: list[dict], metric: str) -> dict:
    """Mean over prompts of (mean over images) and of (best image)."""
    if not rows or metric not in rows[0]:
        return {"mean": float("nan"), "best": float("nan")}
    stats = [_summary_stats(r[metric]) for r in rows]
    return {"mean": float(np.mean([s["mean"] for s in stats])), "best": float(np.mean([s["best"] for s in stats]))}


def _collect_method(method, eval_dir: Path, n_tasks: int) -> dict:
    """Score matrices a[j, i] (NaN for i > j) and the method's per-task records."""
    data = {"matrices": {}, "tasks": [], "combine": None}
    for metric in ("clip_i", "clip_t"):
        for stat in ("mean", "best"):
            data["matrices"][f"{metric}_{stat}"] = np.full((n_tasks, n_tasks), np.nan)
    for j in range(n_tasks):
        unit = json.loads((eval_dir / f"task_{j + 1:04d}.json").read_text())
        for i, scores in unit["concepts"].items():
            for metric in ("clip_i", "clip_t"):
                for stat in ("mean", "best"):
                    data["matrices"][f"{metric}_{stat}"][j, int(i)] = scores[metric][stat]
        data["combine"] = unit["combine"]
        change = unit.get("generic_kv_change")
        data.setdefault("generic_kv_change", []).append(change["total"] if change else None)
        if change and j == n_tasks - 1:
            data["generic_kv_change_layers"] = change["layers"]
        if j == n_tasks - 1:  # the items of the single-concept figures: (concept, prompt) after the last task
            data["single_items"] = [
                {"concept": int(i), "prompt": r["prompt"], "clip_i": float(np.mean(r["clip_i"])),
                 "clip_t": float(np.mean(r["clip_t"]))}
                for i, scores in sorted(unit["concepts"].items(), key=lambda kv: int(kv[0])) for r in scores["prompts"]]
        record = method.record(j)
        data["tasks"].append({k: v for k, v in record.items() if k != "instance_prompts"})
    data["matrices"] = {k: [[None if math.isnan(x) else x for x in row] for row in m.tolist()]
                        for k, m in data["matrices"].items()}
    if (eval_dir / "multi.json").is_file():
        multi = json.loads((eval_dir / "multi.json").read_text())
        data["multi"] = {"clip_i": multi["clip_i"], "clip_t": multi["clip_t"], "combine": multi["combine"],
                         "prompts": [{"prompt": r["prompt"], "clip_i": _summary_stats(r["clip_i"]),
                                      "clip_t": _summary_stats(r["clip_t"])} for r in multi["prompts"]]}
    if (eval_dir / "zero_shot.json").is_file():
        stored = json.loads((eval_dir / "zero_shot.json").read_text())
        data["zero_shot"] = stored["summary"]
        data["zero_shot_per_prompt"] = stored.get("per_prompt")
    return data


def score_matrix(method_result: dict, name: str = "clip_i_mean") -> np.ndarray:
    """A method's score matrix as a float array (NaN above the diagonal)."""
    return np.array([[np.nan if x is None else x for x in row] for row in method_result["matrices"][name]], dtype=float)


def summarize(results: dict) -> dict:
    """Per method, averaged over sets: Table 1 (single: last-row means of CLIP-I / CLIP-T, and
    A_T, F_T, BWT of CLIP-I), Table 2 (multi-concept scores, bytes stored per concept, combine
    time and memory), training time per concept, zero-shot preservation."""
    summary = {}
    for key in results["methods"]:
        per_set = [s["methods"][key] for s in results["sets"] if key in s["methods"]]
        if not per_set:
            continue
        row: dict = {}
        for stat in ("mean", "best"):
            ci = [score_matrix(m, f"clip_i_{stat}") for m in per_set]
            ct = [score_matrix(m, f"clip_t_{stat}") for m in per_set]
            row[f"single_clip_i_{stat}"] = float(np.mean([m[-1].mean() for m in ci]))
            row[f"single_clip_t_{stat}"] = float(np.mean([m[-1].mean() for m in ct]))
            cs = [continual_or_nan(m) for m in ci]
            row[f"A_T_{stat}"] = float(np.mean([c["average"] for c in cs]))
            row[f"F_T_{stat}"] = float(np.mean([c["forgetting"] for c in cs]))
            row[f"BWT_{stat}"] = float(np.mean([c["bwt"] for c in cs]))
            multis = [m["multi"] for m in per_set if "multi" in m]
            if multis:
                row[f"multi_clip_i_{stat}"] = float(np.mean([m["clip_i"][stat] for m in multis]))
                row[f"multi_clip_t_{stat}"] = float(np.mean([m["clip_t"][stat] for m in multis]))
        records = [t for m in per_set for t in m["tasks"]]
        row["stored_bytes_per_concept"] = float(np.mean([t["stored_bytes"] for t in records]))
        row["train_seconds_per_concept"] = float(np.mean([t["train_seconds"] for t in records]))
        combines = [m["multi"]["combine"] if "multi" in m else m["combine"] for m in per_set]
        row["combine_seconds"] = float(np.mean([c["combine_seconds"] for c in combines]))
        row["combine_bytes"] = float(np.mean([c["combine_bytes"] for c in combines]))
        zs = [m["zero_shot"] for m in per_set if "zero_shot" in m]
        if zs:
            row["zero_shot_clip_t"] = float(np.mean([z["clip_t"] for z in zs]))
            if "attribute_mean" in zs[0]:
                row["zero_shot_attributes"] = float(np.mean([z["attribute_mean"] for z in zs]))
        changes = [m.get("generic_kv_change") for m in per_set]
        if all(c and None not in c for c in changes):
            row["generic_kv_change_curve"] = np.mean(changes, axis=0).tolist()
        first = [score_matrix(m, "clip_i_mean")[:, 0] for m in per_set]
        row["first_concept_curve"] = np.mean(first, axis=0).tolist()
        summary[key] = row
    return summary


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _bytes(x: float) -> str:
    if x < 1024:
        return f"{x:.0f} B"
    if x < 1024 ** 2:
        return f"{x / 1024:.1f} KiB"
    return f"{x / 1024 ** 2:.2f} MiB"


def write_report(out: Path, results: dict) -> None:
    """report.md with the tables, the plots and the image grids."""
    out = Path(out)
    summary, labels = results["summary"], results["labels"]
    plots = write_plots(out, results)
    grids = write_grids(out, results)
    lines = [
        "# Continual personalization on the tiny world: CNS, its ablations and the peers",
        "",
        f"Model: `{results['model']}`. This invocation took {results.get('seconds', 0):.0f} s (a resumed run "
        "counts only what it redid).",
        "",
        "## Settings",
        "",
    ]
    lines += [f"- {line}" for line in results["settings"]]
    lines += [
        "",
        "Scores: CLIP-I = mean cosine between a generated image and each of the concept's images; "
        "CLIP-T = cosine between a generated image and its prompt (tokens read as their class word, "
        "per the conventions above). *mean*: over all images of a prompt; *best*: the best image of "
        "each prompt (per metric), as the paper keeps the best of 50. Both are then averaged over "
        "prompts and concepts, and over sets.",
        "",
        "## Table 1: single-concept personalization after the last task, and continual summaries",
        "",
        "A_T, F_T, BWT of the CLIP-I (mean) score matrix a[j, i] (concept i after task j).",
        "",
        "| method | CLIP-I | CLIP-T | CLIP-I best-of-N | CLIP-T best-of-N | A_T | F_T | BWT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, row in summary.items():
        lines.append(f"| {labels[key]} | {_fmt(row['single_clip_i_mean'])} | {_fmt(row['single_clip_t_mean'])} | "
                     f"{_fmt(row['single_clip_i_best'])} | {_fmt(row['single_clip_t_best'])} | "
                     f"{_fmt(row['A_T_mean'])} | {_fmt(row['F_T_mean'])} | {_fmt(row['BWT_mean'])} |")
    lines += [
        "",
        "## Table 2: multi-concept personalization and cost",
        "",
        "Combine: the extra time and memory to build, from what the method stores, one model that draws "
        "every learned concept (a sum of LoRA deltas, Mix-of-Show's fusion, or for CNS and the K/V ablations "
        "writing the stored values in place), beyond loading the base model.",
        "",
        "| method | CLIP-I | CLIP-T | CLIP-I best-of-N | CLIP-T best-of-N | stored / concept | combine time | "
        "combine memory | training / concept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in summary.items():
        lines.append(f"| {labels[key]} | {_fmt(row.get('multi_clip_i_mean'))} | {_fmt(row.get('multi_clip_t_mean'))} | "
                     f"{_fmt(row.get('multi_clip_i_best'))} | {_fmt(row.get('multi_clip_t_best'))} | "
                     f"{_bytes(row['stored_bytes_per_concept'])} | {row['combine_seconds']:.3f} s | "
                     f"{_bytes(row['combine_bytes'])} | {row['train_seconds_per_concept']:.1f} s |")
    if any("zero_shot_clip_t" in r for r in summary.values()):
        base = results["base"].get("zero_shot", {})
        lines += [
            "",
            "## Zero-shot preservation (generic prompts naming no learned concept)",
            "",
            "| method | CLIP-T | Δ vs base | attribute accuracy | Δ vs base |",
            "|---|---|---|---|---|",
            f"| base model | {_fmt(base.get('clip_t'))} | – | {_fmt(base.get('attribute_mean'))} | – |",
        ]
        for key, row in summary.items():
            ct, at = row.get("zero_shot_clip_t"), row.get("zero_shot_attributes")
            d_ct = None if ct is None or "clip_t" not in base else ct - base["clip_t"]
            d_at = None if at is None or "attribute_mean" not in base else at - base["attribute_mean"]
            lines.append(f"| {labels[key]} | {_fmt(ct)} | {_fmt(d_ct)} | {_fmt(at)} | {_fmt(d_at)} |")
    lines += ["", "## Forgetting of the first concept (CLIP-I after each task)", ""]
    for key, row in summary.items():
        lines.append(f"- {labels[key]}: " + " → ".join(_fmt(x) for x in row["first_concept_curve"]))
    if any("generic_kv_change_curve" in r for r in summary.values()):
        lines += ["", "## Diagnosis: how far the keys and values of held-out generic prompts moved from the base model",
                  "", "||(W_j - W_0) C|| / ||W_0 C|| over every cross-attention K/V layer, C: every position of the "
                  "zero-shot prompts, after each task j (`cns.diagnostics`).", ""]
        for key, row in summary.items():
            if "generic_kv_change_curve" in row:
                lines.append(f"- {labels[key]}: " + " → ".join(f"{100 * x:.1f}%" for x in row["generic_kv_change_curve"]))
    for name in plots:
        lines += ["", f"![]({name})"]
    for s, set_result in enumerate(results["sets"], 1):
        lines += ["", f"## Set {s}: score matrices (CLIP-I mean, rows = after task j, columns = concept i)", ""]
        order = [c["name"] for c in set_result["concepts"]]
        for key, m in set_result["methods"].items():
            lines += [f"**{labels[key]}**", "", "| after task | " + " | ".join(order) + " |",
                      "|---|" + "---|" * len(order)]
            for j, row in enumerate(m["matrices"]["clip_i_mean"], 1):
                lines.append(f"| {j} | " + " | ".join(_fmt(x) for x in row) + " |")
            lines.append("")
        if set_result["multi_prompts"]:
            lines += ["Multi-concept prompts:", ""]
            lines += [f"- `{m['prompt']}` ({', '.join(m['concepts'])})" for m in set_result["multi_prompts"]]
    if grids:
        lines += ["", "## Images (set 1): each concept's images beside what each method draws after the last task", ""]
        for name in grids:
            lines += [f"![]({name})", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def write_plots(out: Path, results: dict) -> list[str]:
    """forgetting.png (first concept's CLIP-I after each task, per method) and
    score_matrices.png (CLIP-I heat maps, averaged over sets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    summary, labels = results["summary"], results["labels"]
    if not summary:
        return names
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, row in summary.items():
        curve = row["first_concept_curve"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=labels[key])
    ax.set_xticks(range(1, len(next(iter(summary.values()))["first_concept_curve"]) + 1))
    ax.set_xlabel("after task")
    ax.set_ylabel("CLIP-I of the first concept")
    ax.set_title("Forgetting of the first concept")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "forgetting.png", dpi=100)
    plt.close(fig)
    names.append("forgetting.png")

    keys = list(summary)
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    with warnings.catch_warnings():  # the upper triangle is NaN in every set
        warnings.simplefilter("ignore", RuntimeWarning)
        matrices = {k: np.nanmean([score_matrix(s["methods"][k]) for s in results["sets"] if k in s["methods"]],
                                   axis=0) for k in keys}
    finite = np.concatenate([m[np.isfinite(m)] for m in matrices.values()])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    for ax in axes.flat:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        ax.axis("on")
        image = ax.imshow(np.ma.masked_invalid(matrices[key]), vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_title(labels[key] if len(labels[key]) <= 28 else key, fontsize=8)
        ax.set_xlabel("concept i", fontsize=7)
        ax.set_ylabel("after task j", fontsize=7)
        n = matrices[key].shape[0]
        ax.set_xticks(range(n), [str(i + 1) for i in range(n)], fontsize=6)
        ax.set_yticks(range(n), [str(i + 1) for i in range(n)], fontsize=6)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.7, label="CLIP-I")
    fig.savefig(out / "score_matrices.png", dpi=100)
    plt.close(fig)
    names.append("score_matrices.png")
    return names


def write_grids(out: Path, results: dict) -> list[str]:
    """grid_<method>.png for set 1: per concept, a row of its images then what the method drew
    for the concept's first prompt after the last task."""
    from PIL import Image

    if not results["sets"]:
        return []
    set_result = results["sets"][0]
    names = []
    for key in set_result["methods"]:
        rows = []
        for c in set_result["concepts"]:
            folder = Path(c["folder"])
            refs = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")[:3]
            drawn = out / "set1" / method_folder(key) / "images" / f"t{len(set_result['concepts'])}-c{c['index'] + 1}-p1.png"
            if not drawn.is_file():
                continue
            drawn_image = Image.open(drawn).convert("RGB")
            zoom = max(1, math.ceil(96 / drawn_image.height))  # small worlds: enlarged, pixel for pixel
            drawn_image = drawn_image.resize((drawn_image.width * zoom, drawn_image.height * zoom), Image.NEAREST)
            h = drawn_image.height
            parts = [Image.open(p).convert("RGB").resize((h, h)) for p in refs]
            width = sum(p.width for p in parts) + 8 + drawn_image.width
            row = Image.new("RGB", (width, h), (255, 255, 255))
            x = 0
            for p in parts:
                row.paste(p, (x, 0))
                x += p.width
            row.paste(drawn_image, (x + 8, 0))
            rows.append(row)
        if not rows:
            continue
        width = max(r.width for r in rows)
        grid = Image.new("RGB", (width, sum(r.height + 2 for r in rows)), (255, 255, 255))
        y = 0
        for r in rows:
            grid.paste(r, (0, y))
            y += r.height + 2
        name = f"grid_{key}.png"
        grid.save(out / name)
        names.append(name)
    return names
