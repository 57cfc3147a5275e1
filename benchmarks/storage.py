"""Bytes on disk per concept: a CNS task as the library writes it (packed masks, fp32 values,
the embedding row, task.json), against Custom Diffusion's full K/V (+ token) and a rank-4
LoRA on K/V, on the SD-1.5 architecture; plus what smaller encodings would give.

    python benchmarks/storage.py --model sd15 --threads 1
    python benchmarks/storage.py --model dummy

The learned state is fabricated, not trained: the concept's neurons are selected on the
model's (random) weights with the default settings, its values are ``W_{m-1}`` at those
elements plus a delta of the size 500 Adam steps at lr 3e-5 give (normal, std 4.5e-3,
``--delta-std``), and the library's own writer (``ConceptLibrary._commit_task``) writes the
task, which ``ConceptLibrary.verify`` then checks like any other.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cns import __version__  # noqa: E402
from cns.config import LearnConfig  # noqa: E402
from cns.library import MANIFEST, ConceptLibrary, default_calibration_prompts  # noqa: E402
from cns.model import cross_attention_kv_layers, encode_prompts, layer_shapes  # noqa: E402
from cns.selection import select_concept_neurons  # noqa: E402
from cns.sparse import pack_mask  # noqa: E402
from cns.storage import write_json_atomic  # noqa: E402
from cns.testing import make_dummy_pipeline, make_sd15_architecture  # noqa: E402
from cns.training import TrainResult  # noqa: E402

CAPTIONS = ["a photo of a dog on the beach", "a photo of a small dog in a park", "a dog with a red ball",
            "a dog on a sofa", "a photo of a dog in the snow"]
KB = 1024
MB = 1024 * 1024


def fabricate_library(pipe, folder: Path, ratio: float, delta_std: float):
    """A library folder on ``pipe`` holding one task written by the library's own writer."""
    weights = {n: layer.weight.detach() for n, layer in cross_attention_kv_layers(pipe.unet).items()}
    captions = encode_prompts(pipe.tokenizer, pipe.text_encoder, CAPTIONS)
    calibration = encode_prompts(pipe.tokenizer, pipe.text_encoder, default_calibration_prompts())
    selection = select_concept_neurons(weights, captions, calibration, "top_ratio_per_row", ratio)
    mask = selection.concept
    generator = torch.Generator().manual_seed(0)
    values = {n: (weights[n].flatten()[m.flatten()] + delta_std * torch.randn(int(m.sum()), generator=generator)).float()
              for n, m in mask.items()}
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    embedding = {"<new1>": torch.randn(width, generator=generator) * 0.01}
    manifest = {
        "format_version": 1, "cns_version": __version__, "created": "2026-01-01T00:00:00Z",
        "base_model": {"name_or_path": "benchmark", "revision": None, "fingerprint": "0" * 64,
                       "vocab_size": len(pipe.tokenizer), "layers": layer_shapes(pipe.unet),
                       "resolution": pipe.unet.config.sample_size * pipe.vae_scale_factor,
                       "prediction_type": "epsilon"},
        "calibration_prompts": default_calibration_prompts(), "tasks": [],
    }
    folder.mkdir(parents=True)
    write_json_atomic(folder / MANIFEST, manifest)
    library = ConceptLibrary(folder)
    config = LearnConfig()
    record = {
        "token": "<new1>", "class_word": "dog",
        "images": [{"file": f"{i:02d}.jpg", "sha256": hashlib.sha256(bytes([i])).hexdigest()} for i in range(5)],
        "source_folder": "/home/user/photos/dog", "captions": CAPTIONS, "caption_source": "file",
        "instance_prompts": [c.replace("dog", "<new1> dog", 1) for c in CAPTIONS], "class_prompt": "photo of a dog",
        "neurons": sum(int(m.sum()) for m in mask.values()),
        "density": selection.report["density"]["concept"], "selection": selection.report,
    }
    result = TrainResult(values=values, embeddings=embedding, losses=[0.1] * config.steps, seconds=240.0,
                         steps=config.steps)
    library._commit_task([record], [{"token": "<new1>", "mask": mask}], mask, result, config)
    return library, weights, mask, values


def varint_gap_bytes(mask: torch.Tensor) -> int:
    """Bytes of the mask's set positions as LEB128 varints of the gaps between them."""
    index = mask.flatten().nonzero().squeeze(1).numpy()
    gaps = np.diff(index, prepend=-1).astype(np.int64)
    size = np.ones_like(gaps)
    for shift in (7, 14, 21, 28):
        size += gaps >= (1 << shift)
    return int(size.sum())


def entropy_bytes(mask: torch.Tensor) -> float:
    p = float(mask.float().mean())
    if p in (0.0, 1.0):
        return 0.0
    return mask.numel() * -(p * np.log2(p) + (1 - p) * np.log2(1 - p)) / 8


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", help="sd15 (SD-1.5 architecture, random weights) or dummy")
    parser.add_argument("--ratio", type=float, default=LearnConfig().select_ratio)
    parser.add_argument("--delta-std", type=float, default=4.5e-3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = make_sd15_architecture() if args.model == "sd15" else make_dummy_pipeline()

    with tempfile.TemporaryDirectory() as tmp:
        library, weights, mask, values = fabricate_library(pipe, Path(tmp) / "lib", args.ratio, args.delta_std)
        problems = library.verify()
        task = library.path / library.tasks[0]["dir"]
        files = {f.name: f.stat().st_size for f in sorted(task.iterdir())}
        record = json.loads((task / "task.json").read_text())
    total = sum(files.values())
    elements = sum(w.numel() for w in weights.values())
    neurons = sum(int(m.sum()) for m in mask.values())
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]

    print(f"model: {args.model}: {len(weights)} K/V layers, {elements:,} K/V elements; select ratio {args.ratio}")
    print(f"concept neurons: {neurons:,} ({neurons / elements:.3%} of K/V); library verify: "
          f"{'sound' if not problems else problems}")
    print("\nCNS task on disk (one concept), as the library writes it:")
    for name, size in files.items():
        print(f"  {name:<24} {size:>12,} B  {size / MB:8.3f} MiB")
    layer_stats = len(json.dumps(record["concepts"][0]["selection"]["layers"], indent=2))
    print(f"  {'total':<24} {total:>12,} B  {total / MB:8.3f} MiB   (target <= 1 MB; task.json's per-layer "
          f"selection report is {layer_stats:,} B of it)")

    kv_fp32 = elements * 4
    lora = sum(4 * (w.shape[0] + w.shape[1]) for w in weights.values())
    print("\npeers, per concept (weights only, safetensors header not counted):")
    print(f"  Custom Diffusion, all K/V + token, fp32 {kv_fp32 + width * 4:>12,} B  {(kv_fp32 + width * 4) / MB:8.3f} MiB"
          f"  (CNS: {total / (kv_fp32 + width * 4):.1%} of it)")
    print(f"  Custom Diffusion, all K/V + token, fp16 {kv_fp32 // 2 + width * 2:>12,} B  "
          f"{(kv_fp32 // 2 + width * 2) / MB:8.3f} MiB")
    print(f"  LoRA rank 4 on K/V + token, fp32        {lora * 4 + width * 4:>12,} B  {(lora * 4 + width * 4) / MB:8.3f} MiB"
          f"  ({lora:,} parameters)")
    print(f"  LoRA rank 4 on K/V + token, fp16        {lora * 2 + width * 2:>12,} B  {(lora * 2 + width * 2) / MB:8.3f} MiB")

    flat_values = torch.cat([values[n] for n in mask])
    flat_previous = torch.cat([weights[n].flatten()[mask[n].flatten()].float() for n in mask])
    delta = flat_values - flat_previous
    packed = b"".join(pack_mask(mask[n]).numpy().tobytes() for n in mask)
    print("\nsmaller encodings of the same task (sizes computed here, not written by the library):")
    print(f"  masks: packed bits {len(packed):,} B; zlib -9 of them {len(zlib.compress(packed, 9)):,} B; "
          f"varint gaps {sum(varint_gap_bytes(mask[n]) for n in mask):,} B; entropy bound "
          f"{sum(entropy_bytes(mask[n]) for n in mask):,.0f} B")
    for label, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        absolute = (flat_values.to(dtype).float() - flat_values).abs().max().item()
        relative_delta = ((flat_previous + delta.to(dtype).float()) - flat_values).abs().max().item()
        print(f"  values as {label}: {neurons * 2:,} B; max abs error storing W_m {absolute:.2e}, storing the delta "
              f"W_m - W_(m-1) {relative_delta:.2e} (|W_m| max {flat_values.abs().max().item():.3f}, delta std "
              f"{delta.std().item():.1e})")
    best = len(zlib.compress(packed, 9)) + neurons * 2 + files["task.json"] + files["embeddings.safetensors"]
    print(f"  a task with zlib'd masks and fp16 deltas: about {best:,} B ({best / MB:.3f} MiB)")
    print(f"  values alone at 1 byte each (int8 deltas) would be {neurons:,} B: the count of concept neurons sets "
          f"the floor")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
