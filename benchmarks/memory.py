"""Peak resident memory (ru_maxrss of a fresh process per measurement) of `cns learn` on the
dummy model, and of CNS training steps on the SD-1.5 architecture with each memory option of
`cns learn`: --gradient-checkpointing, --mixed-precision bf16, --attention-slicing.

    python benchmarks/memory.py --learn-dummy
    python benchmarks/memory.py --sd15 --resolution 512 --steps 1 --threads 1
    python benchmarks/memory.py --sd15 --resolution 256 --variants none,checkpointing --threads 1

Each figure comes from its own child process (``os.wait4``'s rusage of that child alone), so
nothing one measurement allocated can hide in another's. The SD-1.5 child builds the
pipeline (random weights), selects the concept's neurons, reports the resident memory at
that point (``model``), then trains ``--steps`` steps of batch 1 instance + 1 prior image with
L_reg off, as a first task. ``peak - model`` is what training adds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = {
    "none": {},
    "checkpointing": {"gradient_checkpointing": True},
    "bf16": {"mixed_precision": "bf16"},
    "slicing": {"attention_slicing": "max"},
    "checkpointing+bf16": {"gradient_checkpointing": True, "mixed_precision": "bf16"},
}


def _rss_now_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child_sd15(resolution: int, steps: int, options: dict, threads: int | None) -> None:
    import torch

    from cns.config import LearnConfig
    from cns.library import default_calibration_prompts
    from cns.model import cross_attention_kv_layers, encode_prompts
    from cns.selection import select_concept_neurons
    from cns.testing import make_sd15_architecture
    from cns.tokens import add_tokens
    from cns.training import Example, train_task

    if threads:
        torch.set_num_threads(threads)
    pipe = make_sd15_architecture()
    weights = {n: layer.weight.detach() for n, layer in cross_attention_kv_layers(pipe.unet).items()}
    selection = select_concept_neurons(
        weights, encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a photo of a dog"] * 3),
        encode_prompts(pipe.tokenizer, pipe.text_encoder, default_calibration_prompts()))
    ids = add_tokens(pipe.tokenizer, pipe.text_encoder, ["<new1>"])
    generator = torch.Generator().manual_seed(0)
    examples = [Example(torch.rand(3, resolution, resolution, generator=generator) * 2 - 1, "photo of a <new1> dog")]
    prior = [Example(torch.rand(3, resolution, resolution, generator=generator) * 2 - 1, "photo of a dog")]
    model_kib = _rss_now_kib()
    config = LearnConfig(steps=steps, resolution=resolution, device="cpu", **options)
    result = train_task(pipe, selection.concept, ids, examples, prior, config, progress=False)
    print(json.dumps({"model_kib": model_kib, "step_seconds": result.step_seconds}))


def run_child(command: list[str], env=None) -> tuple[int, str, float]:
    """Run ``command``; return its own peak RSS (KiB), its stdout and its wall time."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}:\n{text[-2000:]}")
    return usage.ru_maxrss, text, time.perf_counter() - started


def learn_dummy(threads: int | None) -> None:
    from cns.testing import make_dummy_pipeline, write_dummy_images

    env = dict(os.environ, OMP_NUM_THREADS=str(threads or 1))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_dummy_pipeline(tmp / "base")
        write_dummy_images(tmp / "dog", count=3)
        cns = [sys.executable, "-m", "cns.cli"]
        subprocess.run(cns + ["init", str(tmp / "lib"), "--model", str(tmp / "base")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        print("`cns learn` on the dummy model (16x16, default 500 steps, 100 class images):")
        for flags in ([], ["--gradient-checkpointing"], ["--mixed-precision", "bf16"],
                      ["--attention-slicing", "max"]):
            token = f"<t{abs(hash(tuple(flags))) % 10_000}>"
            kib, _, seconds = run_child(cns + ["learn", str(tmp / "lib"), "--images", str(tmp / "dog"),
                                               "--class-word", "dog", "--token", token, "--quiet"] + flags, env)
            print(f"  {' '.join(flags) or '(defaults)':<28} peak RSS {kib / 1024:8.1f} MiB   wall {seconds:6.1f} s")
        kib, _, _ = run_child([sys.executable, "-c", "import cns.cli, torch, diffusers, transformers"], env)
        print(f"  {'(python + imports only)':<28} peak RSS {kib / 1024:8.1f} MiB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--learn-dummy", action="store_true", help="measure `cns learn` on the dummy model")
    parser.add_argument("--sd15", action="store_true", help="measure training steps on the SD-1.5 architecture")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_sd15(args.resolution, args.steps, VARIANTS[args.child], args.threads)
        return 0
    if args.learn_dummy:
        learn_dummy(args.threads)
    if args.sd15:
        print(f"SD-1.5 architecture, {args.resolution}x{args.resolution}, {args.steps} CNS step(s), batch 1 + 1 prior, "
              f"CPU, threads {args.threads or 'default'}; a fresh process per row:")
        for variant in args.variants.split(","):
            command = [sys.executable, __file__, "--child", variant, "--resolution", str(args.resolution),
                       "--steps", str(args.steps)] + (["--threads", str(args.threads)] if args.threads else [])
            kib, text, _ = run_child(command)
            info = json.loads(text.strip().splitlines()[-1])
            step = min(info["step_seconds"]) if info["step_seconds"] else float("nan")
            print(f"  {variant:<20} peak RSS {kib / 2**20:6.2f} GiB   model loaded {info['model_kib'] / 2**20:6.2f} GiB   "
                  f"training adds {(kib - info['model_kib']) / 2**20:6.2f} GiB   step {step:7.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
