"""What a new user gets: ``cns init lib --model tiny-world`` then ``cns learn`` with no flags.

Times one concept end to end on the tiny world with the library's defaults (the model's
``cns_settings.json``), prior images included, and scores what the model then draws for the
concept (CLIP-I against the concept's images, CLIP-T against the prompt) beside the base
model. Target: at most 60 s per concept on 2 CPU cores.

    python benchmarks/learn_defaults.py --concepts pip-bird berry-heart halftone
    python benchmarks/learn_defaults.py --concepts pip-bird -- --method paper   # extra learn flags after --
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402

from cns.cli import main as cns  # noqa: E402
from cns.evaluation.metrics import ClipScorer, ClipSettings, clip_i, clip_t, prepare_prompt  # noqa: E402
from cns.generate import generate_images  # noqa: E402
from cns.library import ConceptLibrary, load_base_pipeline  # noqa: E402
from cns.world.concepts import get_concept, write_concept_folder  # noqa: E402
from cns.world.demo import concept_prompt  # noqa: E402
from cns.world.evaluator import EVALUATOR_PATH  # noqa: E402
from cns.world.pretrain import DEFAULT_MODEL_PATH  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", nargs="+", default=["pip-bird"])
    parser.add_argument("--images", type=int, default=4, help="images per prompt to score")
    parser.add_argument("learn_flags", nargs="*", help="extra flags for cns learn (after --)")
    args = parser.parse_args()
    scorer = ClipScorer.from_pretrained(str(EVALUATOR_PATH), device="cpu")
    settings = ClipSettings()
    base = load_base_pipeline(str(DEFAULT_MODEL_PATH))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{'concept':<14} {'learn s':>8} {'CLIP-I base':>12} {'CLIP-I after':>13} {'CLIP-T base':>12} "
              f"{'CLIP-T after':>13}")
        for name in args.concepts:
            concept = get_concept(name)
            folder = write_concept_folder(concept, tmp / name, n=5, seed=0)
            lib = tmp / f"lib-{name}"
            cns(["init", str(lib), "--model", "tiny-world"])
            started = time.perf_counter()
            rc = cns(["learn", str(lib), "--images", str(folder), "--class-word", concept.class_word, "--quiet",
                      *args.learn_flags])
            seconds = time.perf_counter() - started
            if rc != 0:
                return rc
            library = ConceptLibrary(lib)
            token = library.tokens[-1]
            pipe = library.load_pipeline()
            prompt = concept_prompt(concept.kind, token, concept.class_word)
            references = scorer.image_embeddings([Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))])
            text = scorer.text_embeddings([prepare_prompt(prompt, {token: concept.class_word}, settings)])
            scores = {}
            for which, model, p in (("base", base, prompt.replace(f"{token} ", "")), ("after", pipe, prompt)):
                images = generate_images(model, p, n=args.images, steps=25, guidance=4.0, seed=0)
                emb = scorer.image_embeddings(images)
                scores[which] = (float(clip_i(emb, references, settings)), float(clip_t(emb, text, settings)))
            print(f"{name:<14} {seconds:8.1f} {scores['base'][0]:12.3f} {scores['after'][0]:13.3f} "
                  f"{scores['base'][1]:12.3f} {scores['after'][1]:13.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
