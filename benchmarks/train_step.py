"""Time of one CNS training step against one step of plain fine-tuning of all K/V weights
plus the token (Custom Diffusion's trainable set) and one step of a rank-4 LoRA (peft) on
every cross-attention K/V plus the token, same model, batch and resolution, in one run.

    python benchmarks/train_step.py --model dummy --threads 1
    python benchmarks/train_step.py --model sd15 --resolution 256 --steps 4 --repeats 3 --threads 1
    python benchmarks/train_step.py --model sd15 --profile --steps 3 --resolution 256 --threads 1
    python benchmarks/train_step.py --model sd15 --device cuda --dtype fp16 --steps 20   # on a GPU

CNS runs as a second task does: its concept mask overlaps an earlier concept's, so L_reg
(Eq. 7) is on. Methods alternate (CNS, plain, LoRA, CNS, ...) so drift on a noisy machine
hits all; the first step of every run is dropped as warm-up; figures are medians over all
kept steps. ``--profile`` adds a torch.profiler breakdown of CNS's step (self time by op,
grouped: UNet, sparse update, regularizer, optimizer). On CUDA the script also reports peak
GPU memory per method and the 500-step estimate (the paper: about 4 minutes on an RTX 3090).
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
from cns.sparse import RowDeltaEmbedding  # noqa: E402
from cns.testing import make_dummy_pipeline, make_sd15_architecture  # noqa: E402
from cns.tokens import add_tokens  # noqa: E402
from cns.training import DenoisingStream, Example, _accelerator, train_task  # noqa: E402

PLAIN = "plain K/V + token"
LORA = "LoRA r4 K/V + token"


def load(model: str):
    if model == "dummy":
        return make_dummy_pipeline()
    if model == "sd15":
        return make_sd15_architecture()
    from cns.library import load_base_pipeline

    return load_base_pipeline(model)


def lora_train(pipe, token_ids, instance, prior, config: LearnConfig, rank: int = 4) -> list[float]:
    """train_task's step (same batch, loss, autocast and Adam) with a peft LoRA of ``rank`` on
    every cross-attention K/V and the token's row; returns each step's seconds. The LoRA
    layers are removed afterwards (the base layers go back in place, unchanged)."""
    from peft import LoraConfig, inject_adapter_in_model

    accelerator = _accelerator(config)
    device = torch.device(config.device) if config.device else accelerator.device
    unet, text_encoder = pipe.unet, pipe.text_encoder
    for module in (unet, text_encoder, pipe.vae):
        module.requires_grad_(False)
        module.to(device)
    names = list(cross_attention_kv_layers(unet))
    stream = DenoisingStream(pipe, instance, prior, config.batch_size, config.seed, config.prior_loss_weight, device)

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=names,
                                       init_lora_weights=True, bias="none"), unet, adapter_name="bench")
    lora_params = [p for n, p in unet.named_parameters() if "lora_" in n]
    embedding = RowDeltaEmbedding(text_encoder.get_input_embeddings(), list(token_ids))
    text_encoder.set_input_embeddings(embedding)
    seconds = []
    try:
        optimizer = accelerator.prepare(torch.optim.Adam(
            [{"params": lora_params, "lr": 1e-4}, {"params": [embedding.trainable_rows], "lr": config.lr_embedding}]))
        for step in range(config.steps):
            started = time.perf_counter()
            with accelerator.autocast():
                loss = stream.loss(unet, text_encoder, stream.batch(step), device)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss.detach())
            seconds.append(time.perf_counter() - started)
    finally:
        for name in names:  # take the LoRA wrappers out again
            parent_name, _, attr = name.rpartition(".")
            parent = unet.get_submodule(parent_name)
            setattr(parent, attr, getattr(parent, attr).base_layer)
        text_encoder.set_input_embeddings(embedding.base)
    return seconds


PROFILE_GROUPS = (
    ("sparse update (index_add, its backward)", ("index_add", "index_select", "aten::index", "take", "gather",
                                                 "scatter")),
    ("optimizer (Adam)", ("_foreach", "Adam", "adam", "addcdiv", "lerp")),
    ("regularizer (L_reg: vector norms)", ("linalg_vector_norm",)),
)


def profile_cns(pipe, masks, ids, examples, prior, config, reg_masks, pretrained, top: int = 18) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        result = train_task(pipe, masks, ids, examples, prior, config, reg_masks=reg_masks, pretrained=pretrained,
                            progress=False)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile of {config.steps} CNS steps ({sum(result.step_seconds):.2f} s of steps), self CPU time by op:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"  {e.key:<48} {e.self_cpu_time_total / 1e3:10.1f} ms {e.self_cpu_time_total / total:7.2%}  x{e.count}")
    grouped = dict.fromkeys([g for g, _ in PROFILE_GROUPS], 0.0)
    for e in events:
        for group, keys in PROFILE_GROUPS:
            if any(k in e.key for k in keys):
                grouped[group] += e.self_cpu_time_total
                break
    for group, value in grouped.items():
        print(f"  group {group:<44} {value / 1e3:10.1f} ms {value / total:7.2%}")
    rest = total - sum(grouped.values())
    print(f"  group {'UNet, text encoder, loss and the rest':<44} {rest / 1e3:10.1f} ms {rest / total:7.2%}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy",
                        help="dummy (built in code), sd15 (SD-1.5 architecture, random weights) or a diffusers folder")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="fp16 / bf16: mixed precision through accelerate (fp32 weights, autocast)")
    parser.add_argument("--methods", default="cns,plain,lora", help="comma-separated subset of cns, plain, lora")
    parser.add_argument("--no-regularizer", action="store_true", help="CNS without L_reg (a first task)")
    parser.add_argument("--profile", action="store_true", help="also profile CNS's step with torch.profiler")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")

    pipe = load(args.model)
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    layers = cross_attention_kv_layers(pipe.unet)
    weights = {n: l.weight.detach() for n, l in layers.items()}

    started = time.perf_counter()
    captions = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a photo of a dog"] * 3)
    earlier_captions = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a photo of a cat"] * 3)
    calibration = encode_prompts(pipe.tokenizer, pipe.text_encoder, default_calibration_prompts())
    encoded = time.perf_counter()
    selection = select_concept_neurons(weights, captions, calibration)
    selected = time.perf_counter()
    masks = selection.concept
    earlier = select_concept_neurons(weights, earlier_captions, calibration).concept
    reg_masks = None if args.no_regularizer else {n: masks[n] & earlier[n] for n in masks}
    pretrained = {n: w.clone() for n, w in weights.items()}
    everything = {n: torch.ones_like(m) for n, m in masks.items()}
    ids = add_tokens(pipe.tokenizer, pipe.text_encoder, ["<new1>"])

    generator = torch.Generator().manual_seed(0)
    examples = [Example(torch.rand(3, resolution, resolution, generator=generator) * 2 - 1, "photo of a <new1> dog")
                for _ in range(3)]
    prior = [Example(torch.rand(3, resolution, resolution, generator=generator) * 2 - 1, "photo of a dog")
             for _ in range(3)]
    precision = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[args.dtype]
    config = LearnConfig(steps=args.steps, batch_size=args.batch_size, resolution=resolution, device=args.device,
                         mixed_precision=precision)

    wanted = [m.strip() for m in args.methods.split(",")]
    names = {"cns": "cns", "plain": PLAIN, "lora": LORA}
    times = {names[m]: [] for m in wanted}
    peak = {names[m]: 0 for m in wanted}
    for _ in range(args.repeats):
        for method in wanted:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            if method == "cns":
                seconds = train_task(pipe, masks, ids, examples, prior, config, reg_masks=reg_masks,
                                     pretrained=pretrained, progress=False).step_seconds
            elif method == "plain":
                seconds = train_task(pipe, everything, ids, examples, prior, config, progress=False).step_seconds
            else:
                seconds = lora_train(pipe, ids, examples, prior, config)
            times[names[method]].extend(seconds[1:])
            if cuda:
                peak[names[method]] = max(peak[names[method]], torch.cuda.max_memory_allocated())

    median = {m: statistics.median(t) for m, t in times.items() if t}
    print(f"model: {args.model}, device {args.device}, {args.dtype}, resolution {resolution}, batch "
          f"{args.batch_size} instance + {args.batch_size} prior, threads {torch.get_num_threads()}, "
          f"{min(len(t) for t in times.values())} timed steps per method")
    print(f"K/V elements: {sum(w.numel() for w in weights.values()):,} in {len(weights)} layers")
    report = selection.report["density"]
    print(f"selection densities: base {report['base']:.4%}, general {report['general']:.4%}, "
          f"concept {report['concept']:.4%} (general share of base {selection.report['general_share_of_base']:.1%})")
    print(f"selection: text encoder {encoded - started:.3f} s, scoring and masks {selected - encoded:.3f} s")
    reg_count = sum(int(m.sum()) for m in reg_masks.values()) if reg_masks else 0
    print(f"trainable K/V elements: cns {sum(int(m.sum()) for m in masks.values()):,} ({density(masks):.3%}; "
          f"{reg_count:,} under L_reg), plain {sum(m.numel() for m in everything.values()):,}")
    for method, value in median.items():
        line = (f"median step: {method:<22} {value * 1000:9.1f} ms (min {min(times[method]) * 1000:9.1f})   "
                f"500 steps: {value * 500 / 60:6.1f} min")
        if cuda:
            line += f"   peak GPU memory {peak[method] / 2**30:.2f} GiB"
        print(line)
    if "cns" in median and PLAIN in median:
        print(f"ratio cns / plain: {median['cns'] / median[PLAIN]:.3f} (target <= 1.05)")
    if "cns" in median and LORA in median:
        print(f"ratio cns / LoRA r4: {median['cns'] / median[LORA]:.3f}")
    if "cns" in median and PLAIN in median:
        print(f"ratio of the fastest steps, cns / plain: {min(times['cns']) / min(times[PLAIN]):.3f}")
    if cuda and "cns" in median:
        print(f"500 CNS steps: {median['cns'] * 500 / 60:.1f} min (paper: about 4 min on an RTX 3090)")

    if args.profile:
        profile_config = LearnConfig(**{**config.to_dict(), "steps": max(2, args.steps)})
        profile_cns(pipe, masks, ids, examples, prior, profile_config, reg_masks, pretrained)
    return 0


if __name__ == "__main__":
    sys.exit(main())
