"""Time to select one concept's neurons (Sec. 4.2): the captions and the calibration prompts
through the text encoder, then scoring (Eq. 3) and the masks (Eq. 4-6) in every K/V layer.

    python benchmarks/selection.py --model dummy --threads 1
    python benchmarks/selection.py --model sd15 --threads 1 --repeats 3

The scoring is timed for cns's path (``select_concept_neurons``) and for the straightforward
per-prompt composition of Eq. 3-6 (the implementation before optimisation), alternating
(reference, cns, reference, cns, ...) so machine load hits both; both must give identical
masks, which the script checks. Figures are medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cns import neurons  # noqa: E402
from cns.library import default_calibration_prompts  # noqa: E402
from cns.model import cross_attention_kv_layers, encode_prompts  # noqa: E402
from cns.selection import select_concept_neurons  # noqa: E402
from cns.testing import make_dummy_pipeline, make_sd15_architecture  # noqa: E402

CAPTIONS = ["a photo of a dog on the beach", "a photo of a small dog in a park", "a dog with a red ball"]


def reference_selection(weights, captions, calibration, ratio):
    """Eq. 3-6 one prompt and one layer at a time (cns before this benchmark's optimisation)."""
    def mask(weight, conditionings):
        return neurons.and_masks(neurons.select_top_ratio_per_row(neurons.wanda_scores(weight, c), ratio)
                                 for c in conditionings)
    result = {}
    for name, weight in weights.items():
        base, general = mask(weight, captions), mask(weight, calibration)
        result[name] = (base, general, base & ~general)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy", help="dummy, sd15 (SD-1.5 architecture, random weights) or a "
                        "diffusers folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-reference", action="store_true", help="time cns's path only")
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
    weights = {n: layer.weight.detach() for n, layer in cross_attention_kv_layers(pipe.unet).items()}
    prompts = default_calibration_prompts()

    encode = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        captions = encode_prompts(pipe.tokenizer, pipe.text_encoder, CAPTIONS)
        calibration = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
        encode.append(time.perf_counter() - started)

    fast, slow = [], []
    for _ in range(args.repeats):
        if not args.no_reference:
            started = time.perf_counter()
            expected = reference_selection(weights, captions, calibration, args.ratio)
            slow.append(time.perf_counter() - started)
        started = time.perf_counter()
        result = select_concept_neurons(weights, captions, calibration, "top_ratio_per_row", args.ratio)
        fast.append(time.perf_counter() - started)
        if not args.no_reference:
            for name, (base, general, concept) in expected.items():
                if not (torch.equal(result.base[name], base) and torch.equal(result.general[name], general)
                        and torch.equal(result.concept[name], concept)):
                    print(f"MISMATCH in {name}: optimised masks differ from the reference")
                    return 1

    elements = sum(w.numel() for w in weights.values())
    print(f"model: {args.model}, threads {torch.get_num_threads()}, {len(weights)} K/V layers, {elements:,} elements, "
          f"{len(captions)} captions + {len(calibration)} calibration prompts, ratio {args.ratio}, "
          f"{args.repeats} repeats (medians)")
    print(f"text encoder ({len(captions) + len(calibration)} prompts, one batch each set): "
          f"{statistics.median(encode):.3f} s")
    print(f"scoring + masks, cns: {statistics.median(fast):.3f} s "
          f"({statistics.median(fast) / (elements * (len(captions) + len(calibration))) * 1e9:.2f} ns per element "
          f"and prompt)")
    if slow:
        print(f"scoring + masks, reference (per prompt, per layer): {statistics.median(slow):.3f} s")
        print(f"speed-up: {statistics.median(slow) / statistics.median(fast):.1f}x, masks identical: yes")
    density = result.report["density"]
    print(f"densities: base {density['base']:.3%}, general {density['general']:.3%}, concept {density['concept']:.3%}")
    print(f"total selection (text encoder + scoring): {statistics.median(encode) + statistics.median(fast):.3f} s "
          f"(target: scoring under 1 s for SD-1.5 on CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
