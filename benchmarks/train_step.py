"""Time of one CNS training step against one step of plain fine-tuning of all K/V weights
plus the token (Custom Diffusion's trainable set), same model, batch and resolution, in one run.

    python benchmarks/train_step.py --model dummy
    python benchmarks/train_step.py --model sd15 --resolution 256 --steps 4 --repeats 3
    python benchmarks/train_step.py --model src/cns/world/weights/tiny-world --batch-size 4

Methods alternate (CNS, plain, CNS, plain, ...) so drift on a noisy machine hits both; the
first step of every run is dropped as warm-up; the figure is the median over all kept steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cns.config import LearnConfig  # noqa: E402
from cns.library import default_calibration_prompts  # noqa: E402
from cns.model import cross_attention_kv_layers, encode_prompts  # noqa: E402
from cns.neurons import density  # noqa: E402
from cns.selection import select_concept_neurons  # noqa: E402
from cns.testing import make_dummy_pipeline, make_sd15_architecture  # noqa: E402
from cns.tokens import add_tokens  # noqa: E402
from cns.training import Example, train_task  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy",
                        help="dummy (built in code), sd15 (SD-1.5 architecture, random weights) or a diffusers folder")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model == "dummy":
        pipe = make_dummy_pipeline()
    elif args.model == "sd15":
        pipe = make_sd15_architecture()
    else:
        from cns.library import load_base_pipeline

        pipe = load_base_pipeline(args.model)
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    layers = cross_attention_kv_layers(pipe.unet)
    weights = {n: l.weight.detach() for n, l in layers.items()}

    started = time.perf_counter()
    captions = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a photo of a dog"] * 3)
    calibration = encode_prompts(pipe.tokenizer, pipe.text_encoder, default_calibration_prompts())
    encoded = time.perf_counter()
    selection = select_concept_neurons(weights, captions, calibration)
    selected = time.perf_counter()
    masks = selection.concept
    everything = {n: torch.ones_like(m) for n, m in masks.items()}
    ids = add_tokens(pipe.tokenizer, pipe.text_encoder, ["<new1>"])

    generator = torch.Generator().manual_seed(0)
    examples = [Example(torch.rand(3, resolution, resolution, generator=generator) * 2 - 1, "photo of a <new1> dog")
                for _ in range(3)]
    prior = [Example(torch.rand(3, resolution, resolution, generator=generator) * 2 - 1, "photo of a dog")
             for _ in range(3)]
    config = LearnConfig(steps=args.steps, batch_size=args.batch_size, resolution=resolution, device="cpu")

    times = {"cns": [], "plain K/V + token": []}
    for _ in range(args.repeats):
        for method, mask in (("cns", masks), ("plain K/V + token", everything)):
            result = train_task(pipe, mask, ids, examples, prior, config, progress=False)
            times[method].extend(result.step_seconds[1:])

    cns_step = statistics.median(times["cns"])
    plain_step = statistics.median(times["plain K/V + token"])
    print(f"model: {args.model}, resolution {resolution}, batch {args.batch_size} instance + "
          f"{args.batch_size} prior, threads {torch.get_num_threads()}, {len(times['cns'])} timed steps per method")
    print(f"K/V elements: {sum(w.numel() for w in weights.values()):,} in {len(weights)} layers")
    report = selection.report["density"]
    print(f"selection densities: base {report['base']:.4%}, general {report['general']:.4%}, "
          f"concept {report['concept']:.4%} (general share of base {selection.report['general_share_of_base']:.1%})")
    print(f"selection: text encoder {encoded - started:.3f} s, scoring and masks {selected - encoded:.3f} s")
    print(f"trainable K/V elements: cns {sum(int(m.sum()) for m in masks.values()):,} ({density(masks):.3%}), "
          f"plain {sum(m.numel() for m in everything.values()):,}")
    print(f"median step: cns {cns_step * 1000:.1f} ms, plain K/V + token {plain_step * 1000:.1f} ms")
    print(f"ratio cns / plain: {cns_step / plain_step:.3f} (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
