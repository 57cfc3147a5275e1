"""``cns evaluate``: the paper's experiments on the tiny world, every method side by side.

    cns evaluate --preset quick --out eval-quick
    cns evaluate --preset paper --out eval-paper --methods cns cns-random cns-noreg kv-all
    accelerate launch --num_processes 2 -m cns.evaluation.cli --preset quick --out eval-quick

``register(subparsers)`` adds the command to ``cns``; ``python -m cns.evaluation.cli`` runs it
alone (that is also the form ``accelerate launch -m`` takes; on a machine without a GPU add
``--multi_gpu`` to ``accelerate launch`` so that it starts a distributed group: the processes
then join as CPU workers). A rerun with the same ``--out`` resumes: finished units are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register", "run_from_args", "add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .methods import METHODS
    from .protocol import PRESETS

    p.add_argument("--preset", choices=PRESETS, default="quick",
                   help="quick: 1 set of 7 concepts, few prompts and images, short training (about an hour on 2 "
                        "CPU cores); paper: 3 sets, 35 single + 7 multi prompts per set, 50 images per prompt")
    p.add_argument("--model", help="base diffusers pipeline (default: the tiny-world model)")
    p.add_argument("--evaluator", help="CLIP model folder or hub id for scoring (default: the tiny world's evaluator)")
    p.add_argument("--out", default="cns-evaluation", help="results folder (a rerun resumes in it)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="METHOD",
                   help=f"methods to run (default: all): {', '.join(METHODS)}")
    p.add_argument("--sets", type=int, help="use the first N continual sets of the preset")
    p.add_argument("--concepts", type=int, help="use the first N concepts of each set")
    p.add_argument("--images", type=int, help="images per prompt")
    p.add_argument("--prompts", type=int, help="single-concept prompts per concept")
    p.add_argument("--multi", type=int, help="multi-concept prompts per set")
    p.add_argument("--zero-shot", type=int, help="generic (zero-shot) prompts")
    p.add_argument("--steps", type=int, help="training steps per concept (every method)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr-neurons", type=float, help="learning rate of K/V elements (CNS, its ablations, all K/V)")
    p.add_argument("--lr-embedding", type=float, help="learning rate of the new tokens' embeddings (every method)")
    p.add_argument("--lr-lora", type=float, help="learning rate of the LoRA methods")
    p.add_argument("--select-ratio", type=float, help="CNS's per-caption share of each K/V row")
    p.add_argument("--sample-steps", type=int, help="DDIM steps per image")
    p.add_argument("--guidance", type=float)
    p.add_argument("--class-images", type=int, help="prior-preservation images per class prompt")
    p.add_argument("--clip-scale", type=float, help="CLIP score scale (2.5 as in CLIPScore / Custom Diffusion)")
    p.add_argument("--clip-at-zero", action="store_true", default=None, help="max(cos, 0) per pair")
    p.add_argument("--keep-tokens", action="store_true",
                   help="score CLIP-T on the prompt as written (default: tokens replaced by their class word)")
    p.add_argument("--text-prefix", help='prefix of CLIP-T texts, e.g. "A photo depicts "')
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, ... (default: a GPU when there is one)")
    p.add_argument("--quiet", action="store_true")


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``evaluate`` to ``cns``'s subcommands."""
    p = subparsers.add_parser("evaluate", help="the paper's experiments on the tiny world: CNS, its ablations and "
                                               "the peers side by side (report.md, results.json, plots)")
    add_arguments(p)
    p.set_defaults(func=run_from_args)
    return p


def protocol_from_args(args):
    from .protocol import preset

    protocol = preset(args.preset)
    overrides = {
        "images_per_prompt": args.images, "single_prompts_per_concept": args.prompts,
        "multi_prompts_per_set": args.multi, "zero_shot_prompts": args.zero_shot, "steps": args.steps,
        "batch_size": args.batch_size, "sample_steps": args.sample_steps, "guidance": args.guidance,
        "num_class_images": args.class_images, "clip_scale": args.clip_scale, "clip_at_zero": args.clip_at_zero,
        "text_prefix": args.text_prefix, "seed": args.seed, "lr_neurons": args.lr_neurons,
        "lr_embedding": args.lr_embedding, "lr_lora": args.lr_lora, "select_ratio": args.select_ratio,
    }
    if args.keep_tokens:
        overrides["replace_tokens_with_class"] = False
    protocol = protocol.with_overrides(**overrides)
    sets = protocol.sets
    if args.sets is not None:
        from .protocol import TINY_WORLD_SETS

        if not 1 <= args.sets <= len(TINY_WORLD_SETS):
            from ..errors import CNSError

            raise CNSError(f"--sets must be between 1 and {len(TINY_WORLD_SETS)}")
        sets = [list(s) for s in TINY_WORLD_SETS[: args.sets]]
    if args.concepts is not None:
        sets = [s[: max(1, args.concepts)] for s in sets]
    protocol.sets = sets
    if any(v is not None for v in (args.sets, args.concepts, *overrides.values())) or args.keep_tokens:
        protocol.name = f"{protocol.name} (modified)"
    return protocol


def run_from_args(args) -> int:
    from ..errors import CNSError
    from ..library import read_prompt_file
    from ..world.evaluator import EVALUATOR_PATH
    from ..world.pretrain import DEFAULT_MODEL_PATH
    from .metrics import ClipScorer
    from .run import DEFAULT_METHODS, run_evaluation

    model = Path(args.model).expanduser() if args.model else DEFAULT_MODEL_PATH
    if args.model is None and not (model / "model_index.json").is_file():
        raise CNSError(f"no tiny-world model at {model}; pretrain one with `python -m cns.world.pretrain` "
                       "or give --model")
    evaluator = Path(args.evaluator).expanduser() if args.evaluator else EVALUATOR_PATH
    if args.evaluator is None and not (evaluator / "config.json").is_file():
        raise CNSError(f"no CLIP evaluator at {evaluator}; train one with `cns world evaluator` or give --evaluator")
    protocol = protocol_from_args(args)
    try:
        scorer = ClipScorer.from_pretrained(str(evaluator), device=args.device)
    except (OSError, ValueError) as exc:
        raise CNSError(f"cannot load the CLIP evaluator {evaluator}: {str(exc).splitlines()[0]}") from None
    calibration = Path(__file__).resolve().parent.parent / "world" / "calibration_prompts.txt"
    prompts = read_prompt_file(calibration) if calibration.is_file() else None
    results = run_evaluation(protocol, str(model), scorer, args.out, methods=args.methods or DEFAULT_METHODS,
                             device=args.device, calibration_prompts=prompts, progress=not args.quiet)
    from .run import _state

    if _state().is_main_process:
        labels = results["labels"]
        print(f"{'method':<48} {'CLIP-I':>7} {'CLIP-T':>7} {'A_T':>7} {'F_T':>7} {'BWT':>7} {'multi I':>8} {'multi T':>8}")
        for key, row in results["summary"].items():
            print(f"{labels[key]:<48} {row['single_clip_i_mean']:7.3f} {row['single_clip_t_mean']:7.3f} "
                  f"{row['A_T_mean']:7.3f} {row['F_T_mean']:7.3f} {row['BWT_mean']:7.3f} "
                  f"{row.get('multi_clip_i_mean', float('nan')):8.3f} {row.get('multi_clip_t_mean', float('nan')):8.3f}")
        print(f"evaluation finished in {results['seconds']:.0f} s: open {Path(args.out) / 'report.md'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cns evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from ..errors import CNSError

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()  # no "Loading pipeline components" bars
    transformers_logging.disable_progress_bar()

    try:
        return run_from_args(args)
    except CNSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
