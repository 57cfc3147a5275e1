"""``cns demo``: continual personalization on the tiny world, end to end, in minutes on a CPU.

It writes a few personal concepts of different kinds (an object, a scene, a style, ...), starts
a concept library on the shipped tiny-world model, learns the concepts one after another with
CNS, and after each task draws every concept learned so far. The evaluator measures CLIP-I
(generated vs the concept's own images) and CLIP-T (image vs prompt, tokens read as their
class word) before and after; ``report.md`` puts each concept's images beside the drawings.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..config import LearnConfig
from ..errors import CNSError

__all__ = ["DemoSettings", "run_demo", "concept_prompt", "prepare_demo_folder", "write_demo_marker",
           "DEFAULT_DEMO_CONCEPTS", "DEMO_MARKER", "DEMO_ENTRIES"]

# The demo folder's marker: it names every file (and folder) an earlier demo wrote there, so that a
# rerun clears exactly those and nothing of the user's (cns never deletes what it did not make).
DEMO_MARKER = ".cns-demo.json"
MADE_BY = "cns demo"
# what run_demo writes at the top of its folder; anything else there is left alone
DEMO_ENTRIES = ("library", "images", "concepts", "report.md", "overview.png", "results.json")

# the object is tiger-star: the shipped model learns the star's orange body and white centre, but of
# berry-heart only its white rim (docs/world/quality.md, "The demo's object is tiger-star")
DEFAULT_DEMO_CONCEPTS = ("tiger-star", "starry-night", "halftone", "pip-bird")
def calibration_prompts() -> list[str]:
    """The tiny world's K = 20 calibration prompts (Eq. 5), from its model's cns_settings.json."""
    from ..model_settings import read_model_settings
    from .pretrain import DEFAULT_MODEL_PATH

    return read_model_settings(str(DEFAULT_MODEL_PATH))["calibration_prompts"]
# what each kind of concept looks like in a prompt, and its class prompt for prior preservation
_PROMPTS = {
    "object": ("a big {token} {word} in the center, on a gray background, flat style",
               "a big {token} {word} on the left and a small blue ring on the right, on a beige background, flat style"),
    "creature": ("a big {token} {word} in the center, on a gray background, flat style",
                 "a big {token} {word} on the right, on a pink background, flat style"),
    "scene": ("a big white circle in the center, on a {token} {word}, flat style",
              "a small red star on the left, on a {token} {word}, flat style"),
    "style": ("a big red heart in the center, on a gray background, {token} {word}",
              "a big blue square on the left, on a beige background, {token} {word}"),
}
_CLASS_PROMPTS = {
    "object": "a big {word} in the center",
    "creature": "a big {word} in the center",
    "scene": "a big circle in the center, on a {word}",
    "style": "a big circle in the center, {word}",
}


def concept_prompt(kind: str, token: str, word: str, which: int = 0) -> str:
    """A generation prompt for a concept of ``kind`` (0: the main one, 1: another context)."""
    return " ".join(_PROMPTS[kind][which].format(token=token, word=word).split())


@dataclass
class DemoSettings:
    """What the demo learns and how it draws. Learning runs with what ``cns learn`` does with no
    flags (the tiny world's recommended settings, recorded by the library), or the paper's CNS
    (``method="paper"``); ``learn`` holds LearnConfig fields set over those."""

    out: Path = Path("cns-demo")
    concepts: tuple[str, ...] = DEFAULT_DEMO_CONCEPTS
    method: str = "default"
    learn: dict = field(default_factory=dict)
    images_per_prompt: int = 4
    sample_steps: int = 30
    guidance: float = 4.0
    seed: int = 0
    model: str | None = None
    evaluator: str | None = None


def demo_learn_config(library, settings: DemoSettings) -> LearnConfig:
    """The library's defaults, the named method, then ``settings.learn``; the demo's seed."""
    from ..model_settings import learn_settings

    return learn_settings(library.default_config(), settings.method, {"seed": settings.seed, **settings.learn})


def run_demo(settings: DemoSettings, progress: bool = True) -> dict:
    """Run the demo into ``settings.out``: a new or empty folder, or one an earlier demo wrote
    (its files are replaced; anything else in it stays). See :func:`prepare_demo_folder`."""
    from .pretrain import DEFAULT_MODEL_PATH

    model = Path(settings.model or DEFAULT_MODEL_PATH)
    if not (model / "model_index.json").is_file():
        raise CNSError(f"no tiny-world model at {model}; pretrain one with `python -m cns.world.pretrain`")
    started = time.perf_counter()
    out = Path(settings.out)
    prepare_demo_folder(out)
    try:
        results = _run_demo(settings, out, model, started, progress)
    except BaseException:  # best effort: what the demo wrote so far stays known as the demo's
        try:
            write_demo_marker(out)
        except (OSError, CNSError):
            pass
        raise
    write_demo_marker(out)
    return results


def _run_demo(settings: DemoSettings, out: Path, model: Path, started: float, progress: bool) -> dict:
    from ..evaluation.metrics import ClipScorer, ClipSettings, clip_i, clip_t, prepare_prompt
    from ..generate import image_grid
    from ..library import ConceptLibrary, ConceptSpec
    from .concepts import get_concept, write_concept_folder
    from .evaluator import EVALUATOR_PATH

    (out / "images").mkdir(parents=True, exist_ok=True)
    evaluator = Path(settings.evaluator or EVALUATOR_PATH)
    scorer = ClipScorer.from_pretrained(str(evaluator), device="cpu") if (evaluator / "config.json").is_file() else None
    if scorer is None:
        warnings.warn(f"no evaluator at {evaluator}: the demo draws, but cannot measure CLIP-I / CLIP-T")
    metric = ClipSettings()

    concepts = [get_concept(name) for name in settings.concepts]
    folders = [write_concept_folder(c, out / "concepts" / c.name, seed=settings.seed) for c in concepts]
    library = ConceptLibrary.create(out / "library", str(model), calibration_prompts=calibration_prompts())
    # references at the model's resolution, so that generated and reference images are equally sharp
    size = library.base_model["resolution"]
    references = {c.name: scorer.image_embeddings(_images(folder, size)) for c, folder in zip(concepts, folders)} \
        if scorer else {}

    def draw(pipe, prompt: str, tag: str):
        images = library.generate(prompt, n=settings.images_per_prompt, steps=settings.sample_steps,
                                  guidance=settings.guidance, seed=settings.seed, pipe=pipe)
        path = out / "images" / f"{tag}.png"
        image_grid(images, cols=len(images)).save(path)
        return images, path.relative_to(out).as_posix()

    def score(images, prompt: str, names: list[str], tokens: dict[str, str]) -> dict:
        if scorer is None:
            return {"clip_i": float("nan"), "clip_t": float("nan")}
        embeddings = scorer.image_embeddings(images)
        text = scorer.text_embeddings([prepare_prompt(prompt, tokens, metric)])
        return {
            "clip_i": sum(clip_i(embeddings, references[n], metric) for n in names) / len(names),
            "clip_t": clip_t(embeddings, text, metric),
        }

    results = {"concepts": [], "multi": [], "settings": {k: str(v) for k, v in vars(settings).items()}}
    base_pipe = library.load_pipeline()
    config = demo_learn_config(library, settings)
    learned: list[tuple] = []  # (concept, token)
    for index, (concept, folder) in enumerate(zip(concepts, folders)):
        prompt_without = concept_prompt(concept.kind, "", concept.class_word)
        before_images, before_path = draw(base_pipe, prompt_without, f"{index + 1}-{concept.name}-before")
        before = score(before_images, prompt_without, [concept.name], {})
        t = time.perf_counter()
        spec = ConceptSpec(folder, concept.class_word, captions_file=folder / "captions.json",
                           class_prompt=_CLASS_PROMPTS[concept.kind].format(word=concept.class_word))
        record = library.learn([spec], config, progress=progress)[0]
        seconds = time.perf_counter() - t
        learned.append((concept, record["token"]))
        tokens = {tok: c.class_word for c, tok in learned}
        pipe = library.load_pipeline()
        prompt = concept_prompt(concept.kind, record["token"], concept.class_word)
        after_images, after_path = draw(pipe, prompt, f"{index + 1}-{concept.name}-after")
        after = score(after_images, prompt, [concept.name], tokens)
        # every earlier concept, drawn again after this task: is it still there?
        for c, token in learned[:-1]:
            again = score(library.generate(concept_prompt(c.kind, token, c.class_word), n=settings.images_per_prompt,
                                           steps=settings.sample_steps, guidance=settings.guidance,
                                           seed=settings.seed, pipe=pipe),
                          concept_prompt(c.kind, token, c.class_word), [c.name], tokens)
            next(r for r in results["concepts"] if r["token"] == token)["after_later_tasks"].append(again["clip_i"])
        results["concepts"].append({
            "name": concept.name, "kind": concept.kind, "class_word": concept.class_word, "token": record["token"],
            "description": concept.description, "examples": (Path("concepts") / concept.name).as_posix(),
            "prompt": prompt, "before": before, "after": after, "before_image": before_path,
            "after_image": after_path, "neurons": record["neurons"], "density": record["density"],
            "learn_seconds": round(seconds, 1), "after_later_tasks": [],
        })
    pipe = library.load_pipeline()
    tokens = {tok: c.class_word for c, tok in learned}
    for prompt, names in _multi_prompts(learned):
        images, path = draw(pipe, prompt, f"multi-{len(results['multi']) + 1}")
        results["multi"].append({"prompt": prompt, "concepts": names, "image": path,
                                 **score(images, prompt, names, tokens)})
    _overview_grid(out, results).save(out / "overview.png")
    results["overview"] = "overview.png"
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["metric"] = metric.describe() if scorer else "no evaluator: not measured"
    results["library"] = library.summary()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _write_report(out, results)
    return results


def _demo_entries(out: Path) -> tuple[list[str], list[str]]:
    """The files and the folders under the demo's own entries of ``out`` (relative POSIX paths,
    sorted). Symbolic links count as files and are never followed."""
    files: list[str] = []
    folders: list[str] = []

    def walk(path: Path, rel: str) -> None:
        if path.is_dir() and not path.is_symlink():
            folders.append(rel)
            for child in sorted(os.scandir(path), key=lambda e: e.name):
                walk(Path(child.path), f"{rel}/{child.name}")
        else:
            files.append(rel)

    for name in DEMO_ENTRIES:
        if os.path.lexists(out / name):
            walk(out / name, name)
    return sorted(files), sorted(folders)


def write_demo_marker(out: Path, empty: bool = False) -> None:
    """Write ``out/.cns-demo.json`` atomically, naming every file and folder now under the demo's
    entries of ``out`` (none with ``empty``)."""
    from ..storage import write_json_atomic

    files, folders = ([], []) if empty else _demo_entries(out)
    write_json_atomic(out / DEMO_MARKER, {"made_by": MADE_BY, "files": files, "folders": folders})


def _read_marker(out: Path) -> tuple[set[str], set[str]]:
    marker = out / DEMO_MARKER
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if (marker.is_symlink() or not isinstance(data, dict) or data.get("made_by") != MADE_BY
            or not isinstance(data.get("files", []), list) or not isinstance(data.get("folders", []), list)):
        raise CNSError(f"{out} has a damaged demo marker {marker.name} and holds files cns may not have made; "
                       "choose a new or empty folder for the demo")
    return ({str(f) for f in data.get("files", []) if isinstance(f, str)},
            {str(f) for f in data.get("folders", []) if isinstance(f, str)})


def prepare_demo_folder(out: Path) -> None:
    """Make ``out`` ready for the demo without touching anything cns did not write.

    A missing or empty folder is used. A folder an earlier demo wrote (it holds the marker
    ``.cns-demo.json``) is cleared of exactly the files the marker lists, and of the folders
    then left empty, under the demo's own entries (``library/``, ``images/``, ``concepts/``,
    ``report.md``, ``overview.png``, ``results.json``); the user's files beside them stay. If any
    other file turns up inside those entries nothing is deleted. Anything else -- a file, a folder
    of the user's -- raises :class:`CNSError`. Afterwards the marker (listing nothing yet) is in
    place, so the folder is known as the demo's even if the run is killed."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise CNSError(f"{out} exists and is not a folder; choose a new or empty folder for the demo")
    if out.is_dir() and any(out.iterdir()):
        if not os.path.lexists(out / DEMO_MARKER):
            raise CNSError(f"{out} holds files cns did not make (it is not an earlier demo's folder); "
                           "choose a new or empty folder for the demo")
        files, folders = _read_marker(out)
        present_files, present_folders = _demo_entries(out)
        # folders holding a listed file are the demo's too
        folders |= {"/".join(f.split("/")[:k]) for f in files for k in range(1, f.count("/") + 1)}
        for rel in present_files:
            if rel not in files:
                raise CNSError(f"{out / rel} was not written by cns demo; nothing was deleted. Move it out of "
                               f"{out}, or choose a new or empty folder for the demo")
        for rel in present_folders:
            if rel not in folders:
                raise CNSError(f"{out / rel} was not made by cns demo; nothing was deleted. Move it out of "
                               f"{out}, or choose a new or empty folder for the demo")
        try:
            for rel in present_files:  # each is listed in the marker, under the demo's entries
                (out / rel).unlink()
            for rel in sorted(present_folders, key=lambda r: r.count("/"), reverse=True):
                if not any((out / rel).iterdir()):
                    (out / rel).rmdir()
        except OSError as exc:
            raise CNSError(f"cannot clear the earlier demo in {out}: {exc.strerror or exc} "
                           f"({exc.filename or out})") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CNSError(f"cannot make the demo folder {out}: {exc.strerror or exc}") from None
    write_demo_marker(out, empty=True)


def _images(folder: Path, size: int):
    from PIL import Image

    return [Image.open(p).convert("RGB").resize((size, size), Image.LANCZOS) for p in sorted(folder.glob("*.png"))]


def _overview_grid(out: Path, results: dict, cell: int = 64, pad: int = 2):
    """One picture of the whole demo: per concept a row of its example images, what the base
    model draws for the class word, and what the model draws after learning the concept; then one
    row per multi-concept prompt. Images are upscaled (nearest) to ``cell`` pixels."""
    from PIL import Image, ImageDraw

    def cells(images) -> list:
        return [im.convert("RGB").resize((cell, cell), Image.NEAREST) for im in images]

    def split(path: str) -> list:  # the images of a one-row grid written by ``image_grid``
        grid = Image.open(out / path)
        side = grid.height - 2 * pad
        n = (grid.width - pad) // (side + pad)
        return [grid.crop((pad + i * (side + pad), pad, pad + i * (side + pad) + side, pad + side)) for i in range(n)]

    rows: list[tuple[str, list, list, list]] = []
    for c in results["concepts"]:
        examples = [Image.open(p) for p in sorted((out / c["examples"]).glob("*.png"))][:4]
        rows.append((f"{c['token']} {c['name']}", cells(examples), cells(split(c["before_image"])),
                     cells(split(c["after_image"]))))
    for m in results["multi"]:
        rows.append((" + ".join(m["concepts"]), [], [], cells(split(m["image"]))))
    label_w, gap, head = 150, 12, 18
    widths = [max((len(r[k]) for r in rows), default=0) for k in (1, 2, 3)]
    width = label_w + sum(w * (cell + pad) + gap for w in widths)
    canvas = Image.new("RGB", (width, head + len(rows) * (cell + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = label_w
    for title, w in zip(("its images", "base model (class word)", "after learning it"), widths):
        draw.text((x, 3), title, fill=(0, 0, 0))
        x += w * (cell + pad) + gap
    for r, (label, *groups) in enumerate(rows):
        y = head + r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), label[:24], fill=(0, 0, 0))
        x = label_w
        for images, w in zip(groups, widths):
            for k, image in enumerate(images):
                canvas.paste(image, (x + k * (cell + pad), y))
            x += w * (cell + pad) + gap
    return canvas


def _multi_prompts(learned) -> list[tuple[str, list[str]]]:
    """Prompts that combine the learned concepts: an object or creature, in a scene, in a style."""
    by_kind = {}
    for concept, token in learned:
        by_kind.setdefault(concept.kind, (concept, token))
    subject = by_kind.get("object") or by_kind.get("creature")
    prompts = []
    if subject and "scene" in by_kind:
        (c, t), (s, st) = subject, by_kind["scene"]
        prompts.append((f"a big {t} {c.class_word} in the center, on a {st} background, flat style", [c.name, s.name]))
    if subject and "style" in by_kind:
        (c, t), (y, yt) = subject, by_kind["style"]
        prompts.append((f"a big {t} {c.class_word} in the center, on a gray background, {yt} style", [c.name, y.name]))
    if subject and "scene" in by_kind and "style" in by_kind:
        (c, t), (s, st), (y, yt) = subject, by_kind["scene"], by_kind["style"]
        prompts.append((f"a big {t} {c.class_word} in the center, on a {st} background, {yt} style",
                        [c.name, s.name, y.name]))
    if "object" in by_kind and "creature" in by_kind:
        (o, ot), (r, rt) = by_kind["object"], by_kind["creature"]
        prompts.append((f"a big {ot} {o.class_word} on the left and a big {rt} {r.class_word} on the right, "
                        "on a gray background, flat style", [o.name, r.name]))
    return prompts


def _write_report(out: Path, results: dict) -> None:
    lines = [
        "# cns demo: continual personalization on the tiny world",
        "",
        f"Concepts learned one after another with CNS into one model, in {results['seconds']:.0f} s. "
        f"Metrics from the tiny world's CLIP evaluator ({results['metric']}).",
        "",
        "| # | concept | kind | token | neurons (share of K/V) | CLIP-I before | CLIP-I after | CLIP-I after all tasks "
        "| CLIP-T after | learn time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(results["concepts"], 1):
        final = c["after_later_tasks"][-1] if c["after_later_tasks"] else c["after"]["clip_i"]
        lines.append(
            f"| {i} | {c['name']} | {c['kind']} | `{c['token']}` | {c['neurons']:,} ({c['density']:.2%}) | "
            f"{c['before']['clip_i']:.3f} | {c['after']['clip_i']:.3f} | {final:.3f} | {c['after']['clip_t']:.3f} | "
            f"{c['learn_seconds']:.0f} s |"
        )
    lines += ["", "![each concept's images, the base model, the personalized model](overview.png)", "",
              "## Each concept: its images, the base model, the personalized model", ""]
    for c in results["concepts"]:
        examples = " ".join(f"![]({c['examples']}/{p.name})" for p in sorted((out / c["examples"]).glob("*.png")))
        lines += [
            f"### `{c['token']}` — {c['name']} ({c['kind']}: {c['description']})",
            "",
            f"Its images: {examples}",
            "",
            f"Base model, class word only — `{c['prompt'].replace(c['token'] + ' ', '')}`:",
            "",
            f"![]({c['before_image']})",
            "",
            f"After learning it — `{c['prompt']}`:",
            "",
            f"![]({c['after_image']})",
            "",
        ]
    if results["multi"]:
        lines += ["## Several concepts in one prompt", "", "| prompt | CLIP-I (mean over its concepts) | CLIP-T |",
                  "|---|---|---|"]
        lines += [f"| `{m['prompt']}` | {m['clip_i']:.3f} | {m['clip_t']:.3f} |" for m in results["multi"]]
        lines.append("")
        for m in results["multi"]:
            lines += [f"`{m['prompt']}`", "", f"![]({m['image']})", ""]
    (out / "report.md").write_text("\n".join(lines))
