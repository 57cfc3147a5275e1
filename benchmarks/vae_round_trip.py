"""Can a tiny-world model's latent space hold a concept's look? For each object and creature
concept, render the demo's main scene for it (a big object in the centre, on gray, flat style)
once with the concept's own look and once in each plain colour of its class, at the model's size,
and score each render against the concept's example images with the evaluator (CLIP-I): true,
and after the VAE's round trip (decode of the mean of encode), which is the best a latent model
can draw it.

    python benchmarks/vae_round_trip.py [--model DIR] [--evaluator DIR] [--seed 0]

A look that scores below a plain colour after the round trip cannot be told from that colour by
CLIP-I, whatever the UNet learns. docs/world/quality.md ("The demo's object is tiger-star") reads
the shipped model's table: the round trip does not predict which concepts the demo learns.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np


def main(argv=None) -> int:
    from diffusers import AutoencoderKL

    from cns.evaluation.metrics import ClipScorer, clip_i
    from cns.world.concepts import CONCEPTS, make_concept_images
    from cns.world.evaluator import EVALUATOR_PATH
    from cns.world.pretrain import DEFAULT_MODEL_PATH, resize_images, vae_round_trip
    from cns.world.render import COLORS, ObjectSpec, Scene, render

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    parser.add_argument("--evaluator", default=str(EVALUATOR_PATH))
    parser.add_argument("--seed", type=int, default=0, help="seed of the concepts' example images")
    args = parser.parse_args(argv)

    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae").eval()
    scorer = ClipScorer.from_pretrained(args.evaluator, device="cpu")
    size = vae.config.sample_size

    def scores(obj: ObjectSpec, references) -> tuple[float, float]:
        scene = Scene((replace(obj, size="big", position="center", offset=(0.0, 0.0)),), "gray", "flat")
        true = resize_images(np.asarray(render(scene, 64))[None], size)
        images = np.concatenate([true, vae_round_trip(vae, true)])
        true_score, trip_score = (clip_i(e[None], references) for e in scorer.image_embeddings(list(images)))
        return true_score, trip_score

    print(f"{'concept':13s} {'own, true':>10s} {'own, VAE':>9s}   best plain colour through the VAE")
    for concept in CONCEPTS:
        if concept.subject is None:
            continue
        references = scorer.image_embeddings([im for im, _ in make_concept_images(concept, seed=args.seed)])
        own_true, own_trip = scores(concept.subject, references)
        plain = {color: scores(ObjectSpec(concept.subject.shape, color), references)[1] for color in COLORS}
        best = max(plain, key=plain.get)
        print(f"{concept.name:13s} {own_true:10.3f} {own_trip:9.3f}   {best} {plain[best]:.3f} "
              f"({own_trip - plain[best]:+.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
