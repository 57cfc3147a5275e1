"""Which training settings make a tiny-world concept recognizable? Learns each concept alone,
in a fresh library, under every combination of the settings given, and measures CLIP-I of what
the model then draws (the demo's main prompt for that concept) against the concept's images,
beside the base model's CLIP-I for the class word alone (``before``).

    python benchmarks/learning_sweep.py --out sweep --concepts berry-heart halftone \\
        --grid lr_neurons=3e-4,1e-3,3e-3 lr_embedding=1e-3,5e-3 neurons=concept,all steps=300
    python benchmarks/learning_sweep.py --out sweep --device cuda ...   # the same on a GPU

Every finished (concept, setting) is a line of ``OUT/results.jsonl`` and is skipped on a rerun;
``--shard i/n`` runs every n-th of them, so that several processes share a sweep. The class
images for prior preservation are drawn once per concept and shared by every setting. The
token's norm after learning is reported beside the text encoder's largest vocabulary norm:
a token far outside the vocabulary's range draws mud.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from cns.config import LearnConfig  # noqa: E402
from cns.evaluation.metrics import ClipScorer, ClipSettings, clip_i  # noqa: E402
from cns.generate import image_grid  # noqa: E402
from cns.library import ConceptLibrary, ConceptSpec  # noqa: E402
from cns.world.concepts import get_concept, write_concept_folder  # noqa: E402
from cns.world.demo import (  # noqa: E402
    _CLASS_PROMPTS, DemoSettings, calibration_prompts, _images, concept_prompt, demo_learn_config,
)
from cns.world.evaluator import EVALUATOR_PATH  # noqa: E402
from cns.world.pretrain import DEFAULT_MODEL_PATH  # noqa: E402

NUMERIC = {"lr_neurons": float, "lr_embedding": float, "steps": int, "select_ratio": float, "batch_size": int,
           "lambda_previous": float, "prior_loss_weight": float}


def parse_grid(items: list[str]) -> list[dict]:
    """``["a=1,2", "b=x"]`` -> every combination as a dict of LearnConfig fields."""
    axes = []
    for item in items:
        key, _, values = item.partition("=")
        if key not in LearnConfig.__dataclass_fields__:
            raise SystemExit(f"unknown LearnConfig field {key!r}")
        cast = NUMERIC.get(key, str)
        axes.append([(key, cast(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--concepts", nargs="+", default=list(DemoSettings.concepts))
    parser.add_argument("--grid", nargs="+", default=["lr_neurons=1e-3"], help="FIELD=v1,v2 ... (LearnConfig fields)")
    parser.add_argument("--images", type=int, default=4, help="images drawn per setting")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th job, starting at the i-th")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shard, shards = map(int, args.shard.split("/"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    done = set()
    if results_file.exists():
        done = {(r["concept"], json.dumps(r["setting"], sort_keys=True))
                for r in map(json.loads, results_file.read_text().splitlines())}

    # the settings the sweeps of docs/world/learning.md ran from: the paper's CNS, 300 steps
    demo = DemoSettings(method="paper", learn={"steps": 300, "class_image_steps": 30})
    scorer = ClipScorer.from_pretrained(str(EVALUATOR_PATH), device=args.device)
    metric = ClipSettings()
    jobs = [(c, s) for c in args.concepts for s in parse_grid(args.grid)][shard::shards]
    work = Path(tempfile.mkdtemp(prefix="cns-sweep-"))
    base = {}
    for name, setting in jobs:
        key = json.dumps(setting, sort_keys=True)
        if (name, key) in done:
            continue
        concept = get_concept(name)
        folder = work / "concepts" / name
        class_dir = work / "class" / name
        class_prompt = _CLASS_PROMPTS[concept.kind].format(word=concept.class_word)
        if name not in base:
            write_concept_folder(concept, folder, seed=demo.seed)
            library = ConceptLibrary.create(work / f"base-{name}", str(DEFAULT_MODEL_PATH),
                                            calibration_prompts=calibration_prompts())
            pipe = library.load_pipeline(device=args.device)
            size = library.base_model["resolution"]
            references = scorer.image_embeddings(_images(folder, size))
            class_dir.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(library.generate(class_prompt, n=library.default_config().num_class_images, steps=demo.sample_steps,
                                                       guidance=demo.guidance, seed=demo.seed, pipe=pipe)):
                image.save(class_dir / f"{i:02d}.png")
            before = library.generate(concept_prompt(concept.kind, "", concept.class_word), n=args.images,
                                      steps=demo.sample_steps, guidance=demo.guidance, seed=demo.seed, pipe=pipe)
            base[name] = (references, clip_i(scorer.image_embeddings(before), references, metric))
        references, before_score = base[name]
        library = ConceptLibrary.create(Path(tempfile.mkdtemp(dir=work)) / "lib", str(DEFAULT_MODEL_PATH),
                                        calibration_prompts=calibration_prompts())
        config = dataclasses.replace(demo_learn_config(library, demo), device=args.device, **setting)  # varied
        spec = ConceptSpec(folder, concept.class_word, captions_file=folder / "captions.json", class_data_dir=class_dir,
                           class_prompt=class_prompt)
        t = time.perf_counter()
        record = library.learn([spec], config, progress=False)[0]
        seconds = time.perf_counter() - t
        pipe = library.load_pipeline(device=args.device)
        embeddings = pipe.text_encoder.get_input_embeddings().weight.detach()
        token_id = pipe.tokenizer.convert_tokens_to_ids(record["token"])
        images = library.generate(concept_prompt(concept.kind, record["token"], concept.class_word), n=args.images,
                                  steps=demo.sample_steps, guidance=demo.guidance, seed=demo.seed, pipe=pipe)
        tag = f"{name}-" + "-".join(f"{k}{v}" for k, v in sorted(setting.items()))
        image_grid(images, cols=len(images)).save(out / f"{tag}.png")
        row = {"concept": name, "setting": setting, "before": round(before_score, 4),
               "after": round(clip_i(scorer.image_embeddings(images), references, metric), 4),
               "token_norm": round(embeddings[token_id].norm().item(), 3),
               "vocab_max_norm": round(embeddings[:token_id].norm(dim=1).max().item(), 3),
               "density": record["density"], "learn_seconds": round(seconds, 1), "image": f"{tag}.png"}
        with results_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
