"""Drawing the evaluation's images one prompt at a time vs batched across prompts.

The tiny world's zero-shot prompts of the standard preset (48 prompts x 2 images, 25 DDIM
steps, guidance 4), drawn by the shipped tiny-world model both ways in one process, repeated
and interleaved; prints the seconds of each and the largest pixel difference between them.

    python benchmarks/eval_generation.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cns.evaluation import run as run_module  # noqa: E402
from cns.evaluation.protocol import preset  # noqa: E402
from cns.evaluation.run import tiny_world_zero_shot  # noqa: E402
from cns.library import load_base_pipeline  # noqa: E402
from cns.world.pretrain import DEFAULT_MODEL_PATH  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=48)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = preset("standard")
    pipe = load_base_pipeline(str(DEFAULT_MODEL_PATH))
    pipe.set_progress_bar_config(disable=True)
    prompts = tiny_world_zero_shot(args.prompts, protocol.seed).prompts
    jobs = [(k, {"prompt": p, "n": run_module.ZERO_SHOT_IMAGES, "seed_offset": 1000 * k}) for k, p in enumerate(prompts)]
    seconds = {"one prompt at a time": [], f"batched across prompts ({run_module.GENERATION_BATCH})": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        alone = [run_module.generate_images(pipe, j["prompt"], j["n"], protocol, j["seed_offset"]) for _, j in jobs]
        seconds["one prompt at a time"].append(time.perf_counter() - t)
        t = time.perf_counter()
        batched = [images for _, _, images in run_module._draw_jobs(pipe, jobs, protocol)]
        seconds[f"batched across prompts ({run_module.GENERATION_BATCH})"].append(time.perf_counter() - t)
    diff = max(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()
               for x, y in zip(alone, batched) for a, b in zip(x, y))
    n = sum(j["n"] for _, j in jobs)
    for name, values in seconds.items():
        print(f"{name:<32} {min(values):6.2f} s for {n} images (best of {len(values)}: "
              + ", ".join(f"{v:.2f}" for v in values) + ")")
    first, second = (min(v) for v in seconds.values())
    print(f"speed-up {first / second:.2f}x; largest pixel difference {diff} (of 255)")


if __name__ == "__main__":
    main()
