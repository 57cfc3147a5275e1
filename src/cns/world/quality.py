"""Quality bar of the tiny world's base model, measured with its evaluator.

    python -m cns.world.quality --n 200 --split heldout --grid docs/world/base_samples.png

Prompts are captions of fresh scenes (by default of the held-out attribute combinations that
pretraining never saw). Single-object prompts: zero-shot attribute accuracy (shape, color,
background, style) of the generated images. Two-object prompts: background and style
accuracy, and whether both named shapes are the evaluator's two most likely shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

__all__ = ["measure_quality"]


def _generate(pipe, prompts, steps, guidance, seed, batch=50):
    import torch

    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generator = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images
    return images


def measure_quality(model: str, evaluator: str, n: int = 200, split: str = "heldout", steps: int = 30,
                    guidance: float = 4.0, seed: int = 0, two_objects: int = 100,
                    scheduler: str | None = None, vae: bool = True) -> dict:
    """Attribute accuracy of the model's images for held-out (or train-split) captions.

    ``scheduler``: a diffusers scheduler class name (``DPMSolverMultistepScheduler``, ...) to
    sample with instead of the model's own, built from the model's scheduler config. ``vae``:
    also run `vae_check` on the model's VAE and score the prompts' true renders at the model's
    size and after a VAE round trip (``reference_through_vae``: the best the model can draw)."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    from ..evaluation.metrics import ClipScorer, cosine_matrix
    from PIL import Image

    from .evaluator import IMAGE_SIZE, attribute_prompts, attribute_report
    from .render import caption, render, sample_scene

    pipe = StableDiffusionPipeline.from_pretrained(model)
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    scorer = ClipScorer.from_pretrained(evaluator, device="cpu")
    rng = np.random.default_rng([seed, 7, 0 if split == "train" else 1])
    single = [sample_scene(rng, split, n_objects=1) for _ in range(n)]
    started = time.perf_counter()
    single_images = _generate(pipe, [caption(s) for s in single], steps, guidance, seed)
    report = {"model": model, "split": split, "steps": steps, "guidance": guidance, "prompts_single": n,
              "scheduler": type(pipe.scheduler).__name__,
              "single_object": attribute_report(scorer, single, single_images)}
    report["single_object"]["mean"] = float(np.mean(list(report["single_object"].values())))
    renders = np.stack([np.asarray(render(s, IMAGE_SIZE)) for s in single])
    report["reference_renders"] = attribute_report(  # the evaluator on true renders
        scorer, single, [Image.fromarray(im) for im in renders])
    if vae:  # the same true renders at the model's size, and through its VAE: what the model could reach
        from .pretrain import resize_images, vae_round_trip

        size = pipe.vae_scale_factor * pipe.unet.config.sample_size
        small = resize_images(renders, size)
        report["reference_at_model_size"] = attribute_report(scorer, single, [Image.fromarray(im) for im in small])
        report["reference_through_vae"] = attribute_report(
            scorer, single, [Image.fromarray(im) for im in vae_round_trip(pipe.vae, small)])

    if two_objects:
        double = [sample_scene(rng, split, n_objects=2) for _ in range(two_objects)]
        images = _generate(pipe, [caption(s) for s in double], steps, guidance, seed + 10_000)
        emb = scorer.image_embeddings(images)
        result = {}
        for attribute in ("background", "style"):
            labels, prompts = attribute_prompts(attribute)
            predicted = cosine_matrix(emb, scorer.text_embeddings(list(prompts))).argmax(dim=1).tolist()
            truth = [getattr(s, attribute) for s in double]
            result[attribute] = float(np.mean([labels[p] == t for p, t in zip(predicted, truth)]))
        labels, prompts = attribute_prompts("shape")
        top2 = cosine_matrix(emb, scorer.text_embeddings(list(prompts))).topk(2, dim=1).indices.tolist()
        result["both_shapes"] = float(np.mean([
            {labels[i] for i in top} == {o.shape for o in s.objects} or
            (len({o.shape for o in s.objects}) == 1 and labels[top[0]] == s.objects[0].shape)
            for top, s in zip(top2, double)
        ]))
        report["two_objects"] = result
        report["prompts_two"] = two_objects
        report["_two_images"] = images
    if vae:
        report["vae"] = vae_check(pipe.vae, seed)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["_single_images"] = single_images
    report["_single_prompts"] = [caption(s) for s in single]
    return report


def vae_check(vae, seed: int = 0, n: int = 200) -> dict:
    """Reconstruction error (MSE, pixels in [-1, 1]) of pretraining-like renders and of each
    personal concept's images: a concept must be a new combination of seen parts, within twice
    the error of the world it was drawn from (``within_2x``, the issue's criterion). Images are
    shown at the VAE's own size (the model's, 32 px for the tiny world), downsampled as the
    pretraining pool is. The world's per-image errors vary: ``world_within_2x`` is the share of
    its own images that pass the criterion, ``concept_world_percentile`` places each concept's
    mean error among them, and ``above_world_max`` counts the concepts whose error no
    pretraining-like image reaches."""
    from .concepts import CONCEPTS, make_concept_images
    from .pretrain import resize_images, vae_reconstruction_errors
    from .render import render, sample_scene

    size = vae.config.sample_size
    rng = np.random.default_rng([seed, 11])
    world_images = np.stack([np.asarray(render(sample_scene(rng, "train"), 64)) for _ in range(n)])
    world = vae_reconstruction_errors(vae, resize_images(world_images, size))
    base = float(world.mean())
    errors = {}
    for concept in CONCEPTS:
        images = np.stack([np.asarray(im) for im, _ in make_concept_images(concept, seed=seed)])
        errors[concept.name] = float(vae_reconstruction_errors(vae, resize_images(images, size)).mean())
    ratios = {name: round(error / base, 3) for name, error in errors.items()}
    return {"world_mse": round(base, 5),
            "world_mse_spread": {name: round(float(np.quantile(world, q)), 5)
                                 for name, q in (("median", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
            "concept_mse": {name: round(e, 5) for name, e in errors.items()},
            "concept_mse_ratio": ratios, "within_2x": sum(r <= 2 for r in ratios.values()), "concepts": len(ratios),
            "world_within_2x": round(float((world <= 2 * base).mean()), 3),
            "concept_world_percentile": {name: round(100 * float((world < e).mean()), 1) for name, e in errors.items()},
            "above_world_max": int(sum(e > world.max() for e in errors.values()))}


def main(argv=None) -> int:
    from .evaluator import EVALUATOR_PATH
    from .pretrain import DEFAULT_MODEL_PATH

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    parser.add_argument("--evaluator", default=str(EVALUATOR_PATH))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--two-objects", type=int, default=100)
    parser.add_argument("--split", choices=["train", "heldout"], default="heldout")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", default=None,
                        help="a diffusers scheduler class to sample with (default: the model's own)")
    parser.add_argument("--grid", help="save a grid of the first 32 single-object samples here (PNG)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = measure_quality(args.model, args.evaluator, args.n, args.split, args.steps, args.guidance, args.seed,
                             args.two_objects, args.scheduler)
    if args.grid:
        from ..generate import image_grid

        image_grid(report["_single_images"][:32], cols=8).save(args.grid, optimize=True)
        with open(os.path.splitext(args.grid)[0] + ".txt", "w") as f:
            f.write("\n".join(report["_single_prompts"][:32]) + "\n")
    figures = {k: v for k, v in report.items() if not k.startswith("_")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
