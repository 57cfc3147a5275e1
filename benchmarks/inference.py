"""Generation time of the base model against the same model with 1 and with 7 learned
concepts, all of them in one prompt.

    python benchmarks/inference.py --model dummy --threads 1
    python benchmarks/inference.py --model sd15 --resolution 256 --steps 4 --repeats 3 --threads 1
    python benchmarks/inference.py --model sd15 --resolution 512 --steps 25 --device cuda --dtype fp16

A library's pipeline (``ConceptLibrary.load_pipeline``, or ``cns export``'s folder) is the
base pipeline with other values in some K/V elements and one more embedding row per token:
the same modules, the same operations. Here the concepts are applied the way the library
applies them (:func:`cns.tokens.add_tokens`, then values written at each concept's mask; the
masks are CNS's selection for each concept's caption, the values fabricated), and the three
states - base, 1 concept, 7 concepts - are swapped into one pipeline in turn (base, 1, 7,
base, ...), so machine load hits all. Figures are medians of whole ``pipe(...)`` calls.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from cns.library import default_calibration_prompts  # noqa: E402
from cns.model import cross_attention_kv_layers, encode_prompts  # noqa: E402
from cns.selection import select_concept_neurons  # noqa: E402
from cns.testing import make_dummy_pipeline, make_sd15_architecture  # noqa: E402
from cns.tokens import add_tokens  # noqa: E402

CLASSES = ["dog", "hat", "cat", "bird", "car", "house", "tree"]
PROMPTS = {  # short enough for the dummy model's 16-token context
    0: "dog hat cat bird car house tree",
    1: "<new1> dog hat cat bird car house tree",
    7: "<new1> dog <new2> hat <new3> cat <new4> bird <new5> car <new6> house <new7> tree",
}


def concept_states(pipe, seed: int = 0):
    """``{count: (tokenizer, embedding module, {layer: weight})}`` for 0, 1 and 7 concepts."""
    layers = cross_attention_kv_layers(pipe.unet)
    weights = {n: layer.weight.detach() for n, layer in layers.items()}
    calibration = encode_prompts(pipe.tokenizer, pipe.text_encoder, default_calibration_prompts())
    masks = [select_concept_neurons(weights, encode_prompts(pipe.tokenizer, pipe.text_encoder,
                                                            [f"a photo of a {word}"]), calibration).concept
             for word in CLASSES]
    generator = torch.Generator().manual_seed(seed)
    base_tokenizer = pipe.tokenizer
    base_embedding = copy.deepcopy(pipe.text_encoder.get_input_embeddings())  # resizing may work in place
    states = {0: (base_tokenizer, base_embedding, {n: w.clone() for n, w in weights.items()})}
    for count in (1, 7):
        tokenizer = copy.deepcopy(base_tokenizer)
        pipe.text_encoder.set_input_embeddings(copy.deepcopy(base_embedding))
        ids = add_tokens(tokenizer, pipe.text_encoder, [f"<new{i + 1}>" for i in range(count)])
        embedding = copy.deepcopy(pipe.text_encoder.get_input_embeddings())
        with torch.no_grad():
            for row in ids:
                embedding.weight[row] += 0.01 * torch.randn(embedding.weight.shape[1], generator=generator)
        kv = {n: w.clone() for n, w in weights.items()}
        for mask in masks[:count]:
            for n, m in mask.items():
                kv[n].view(-1)[m.flatten()] += 4.5e-3 * torch.randn(int(m.sum()), generator=generator)
        states[count] = (tokenizer, embedding, kv)
    return states


def set_state(pipe, state) -> None:
    tokenizer, embedding, kv = state
    pipe.tokenizer = tokenizer
    pipe.text_encoder.set_input_embeddings(embedding)
    for name, layer in cross_attention_kv_layers(pipe.unet).items():
        layer.weight.data = kv[name]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy", help="dummy, sd15 (SD-1.5 architecture, random weights) or a "
                        "diffusers folder")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
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
    states = concept_states(pipe)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    for state in states.values():  # every state's tensors on the device, in the dtype
        state[1].to(args.device, dtype)
        for name in state[2]:
            state[2][name] = state[2][name].to(args.device, dtype)
    pipe.to(args.device, dtype)
    cuda = args.device.startswith("cuda")

    parameters = {}
    times = {count: [] for count in states}
    for repeat in range(args.repeats + 1):  # the first round is warm-up
        for count, state in states.items():
            set_state(pipe, state)
            parameters[count] = (len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.shape[0])
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            pipe(PROMPTS[count], num_inference_steps=args.steps, height=resolution, width=resolution,
                 generator=torch.Generator().manual_seed(repeat), output_type="np")
            if cuda:
                torch.cuda.synchronize()
            if repeat:
                times[count].append(time.perf_counter() - started)

    median = {count: statistics.median(t) for count, t in times.items()}
    print(f"model: {args.model}, device {args.device}, {args.dtype}, {resolution}x{resolution}, {args.steps} steps, "
          f"threads {torch.get_num_threads()}, {args.repeats} timed images per state (medians)")
    for count in states:
        tokens, rows = parameters[count]
        print(f"  {count} concept(s): {median[count]:.3f} s per image   ratio to base {median[count] / median[0]:.3f}   "
              f"tokenizer {tokens:,} tokens, embedding {rows:,} rows   prompt: {PROMPTS[count]!r}")
    print("target: ratio 1.00 (the same modules and operations; the difference is noise)")
    if parameters[0][1] > parameters[0][0]:
        print(f"note: the base embedding has {parameters[0][1]:,} rows for a {parameters[0][0]:,}-token tokenizer (the "
              "SD-1.5 architecture stand-in's small tokenizer); adding tokens sizes it to the tokenizer, as cns does")
    return 0


if __name__ == "__main__":
    sys.exit(main())
