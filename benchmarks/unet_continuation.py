"""Would a longer UNet run lift the tiny world's base model? Continues training the shipped
pipeline's UNet and text encoder (same loss, batch and caption dropout as pretraining) for more
steps, then measures it with ``cns.world.quality`` beside the shipped model.

    python benchmarks/unet_continuation.py --work /tmp/cont --steps 3000 --lr 2e-4

The shipped run's optimizer state is not shipped, so this starts a fresh AdamW from the shipped
(EMA) weights, warms up and decays its learning rate as pretraining does (``_lr``), and keeps a
fresh EMA. The VAE is the shipped one: the pool is encoded with it and its scaling factor. The
result is not a model to ship (one command must reproduce the shipped weights in 90 minutes on
2 cores): it measures what more UNet steps would buy.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main(argv=None) -> int:
    from diffusers import StableDiffusionPipeline

    from cns.world.dataset import render_pool
    from cns.world.evaluator import EVALUATOR_PATH
    from cns.world.pretrain import (
        DEFAULT_MODEL_PATH, TinyWorldConfig, encode_pool, resize_images, train_unet,
    )
    from cns.world.quality import measure_quality

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    parser.add_argument("--work", required=True, help="pool cache, checkpoints (resumable) and the result")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--pool-size", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=1, help="pool and batch draws (pretraining used 0)")
    parser.add_argument("--n", type=int, default=200, help="held-out prompts for the quality check")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    config = TinyWorldConfig(unet_steps=args.steps, unet_lr=args.lr, warmup=args.warmup, seed=args.seed,
                             pool_size=args.pool_size)
    config.extra.update(scaling_factor=float(pipe.vae.config.scaling_factor), checkpoint_every=250)
    started = time.perf_counter()
    scenes, images = render_pool(config.pool_size, config.seed, "train", config.render_size, work / "pool",
                                 workers=args.workers, novel_background=config.novel_background,
                                 novel_style=config.novel_style)
    with torch.no_grad():
        latents = encode_pool(pipe.vae, resize_images(images, config.image_size))
    pipe.text_encoder.requires_grad_(True)
    report = train_unet(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, latents, scenes, config, work)
    train_s = time.perf_counter() - started
    out = work / "model"
    pipe.save_pretrained(out, safe_serialization=True)
    result = {"steps": args.steps, "lr": args.lr, "pool_size": args.pool_size, "train_seconds": round(train_s, 1),
              **report}
    for name, model in (("shipped", args.model), ("continued", str(out))):
        quality = measure_quality(model, str(EVALUATOR_PATH), n=args.n, two_objects=0, vae=False)
        result[name] = quality["single_object"]
        print(name, json.dumps({k: round(v, 3) for k, v in quality["single_object"].items()}), flush=True)
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
