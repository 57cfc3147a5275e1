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
                   help="quick: 1 set of 7 concepts, few prompts and images, short training; standard: the quick "
                        "sizes on 3 sets x 3 seeds with 48 zero-shot prompts, figures with intervals; long: all 16 "
                        "tiny-world concepts in one sequence x 3 seeds; paper: 3 sets, 35 single + 7 multi prompts per "
                        "set, 50 images per prompt")
    p.add_argument("--model", help="base diffusers pipeline (default: the tiny-world model)")
    p.add_argument("--evaluator", help="CLIP model folder or hub id for scoring (default: the tiny world's evaluator)")
    p.add_argument("--out", default="cns-evaluation", help="results folder (a rerun resumes in it)")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help=f"methods to run (default: all): {', '.join(METHODS)}; a CNS method with LearnConfig "
                        "settings changed is written KEY:NAME=VALUE,... (e.g. cns:lambda_generic=100)")
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
    p.add_argument("--seed", type=int, help="one run's seed (default 0); see --seeds")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="run every set once per seed (OUT/seed-N/, each resumable) and report every figure with its "
                        "95%% interval over seeds, sets and prompts (default for the standard and long presets: 0 1 2)")
    p.add_argument("--report-only", action="store_true",
                   help="train and draw nothing: write the report from what OUT already holds (each method on the "
                        "runs it finished; paired differences over the runs both methods have)")
    p.add_argument("--reference", default="cns",
                   help="the method every other one is compared with, paired (default: cns)")
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
    from ..model_settings import read_model_settings

    prompts = read_model_settings(str(model)).get("calibration_prompts")
    from dataclasses import replace

    from .aggregate import aggregate, write_interval_report
    from .protocol import STANDARD_SEEDS
    from .run import _state, _write_json

    methods = args.methods or DEFAULT_METHODS
    seeds = args.seeds or (list(STANDARD_SEEDS) if args.preset in ("standard", "long") and args.seed is None else None)
    out = Path(args.out)
    if seeds and args.report_only:  # the seeds that have run, of those asked for
        seeds = [s for s in seeds if (out / f"seed-{s}" / "protocol.json").is_file()] or seeds[:1]
    if seeds:
        runs = [run_evaluation(replace(protocol, seed=seed), str(model), scorer, out / f"seed-{seed}", methods=methods,
                               device=args.device, calibration_prompts=prompts, progress=not args.quiet,
                               finished_only=args.report_only)
                for seed in seeds]
    else:
        runs = [run_evaluation(protocol, str(model), scorer, out, methods=methods, device=args.device,
                               calibration_prompts=prompts, progress=not args.quiet, finished_only=args.report_only)]
    aggregated = aggregate(runs, reference=args.reference)
    report = "report.md" if seeds else "intervals.md"
    if _state().is_main_process:
        settings = runs[0]["settings"] + ([f"seeds: {' '.join(str(s) for s in seeds)} (OUT/seed-N/ holds each seed's "
                                           "own report)"] if seeds else [])
        _write_json(out / "intervals.json", {"seeds": seeds or [protocol.seed], "aggregate": aggregated})
        (out / report).write_text(write_interval_report(
            aggregated, f"Continual personalization on the tiny world ({protocol.name})", settings, _command_line(args)))
        labels = aggregated["labels"]
        figures = aggregated["figures"]
        columns = ("single_clip_i", "single_clip_t", "multi_clip_i", "multi_clip_t", "F_T", "zero_shot_attributes")
        print(f"{'method':<48} " + " ".join(f"{c.replace('_clip_', ' ').replace('zero_shot_', 'zs '):>13}"
                                             for c in columns))
        for key in aggregated["methods"]:
            cells = []
            for c in columns:
                f = figures[key].get(c)
                cells.append(f"{f['mean']:6.3f}±{(f['high'] - f['low']) / 2:5.3f}" if f else f"{'–':>13}")
            print(f"{labels[key][:48]:<48} " + " ".join(f"{x:>13}" for x in cells))
        seconds = sum(r["seconds"] for r in runs)
        print(f"evaluation finished in {seconds:.0f} s: open {out / 'report.md'}"
              + ("" if seeds else f" (the figures with their intervals: {out / report})"))
    return 0


def _command_line(args) -> str:
    """The command as typed, for the report (``cns evaluate ...``)."""
    import shlex

    argv = list(getattr(args, "argv", None) or ["evaluate"])
    return shlex.join(["cns", *argv])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cns evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = ["evaluate", *argv]
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
