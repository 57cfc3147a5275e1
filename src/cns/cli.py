"""The ``cns`` command line: thin over :class:`cns.ConceptLibrary`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .config import LearnConfig
from .errors import CNSError
from .evaluation.cli import register as register_evaluate

__all__ = ["main", "build_parser"]


def _learn_config(args, defaults: LearnConfig | None = None) -> LearnConfig:
    """The library's defaults (the base model's recommended settings), then ``--method``, then
    every flag given."""
    from .model_settings import learn_settings

    fields = ("steps", "seed", "batch_size", "select_ratio", "select_rule", "lr_embedding", "lr_neurons",
              "lambda_previous", "lambda_pretrained", "lambda_keep", "lambda_generic", "lambda_lock", "lambda_refit",
              "generic_padding",
              "prior_loss_weight", "num_class_images", "class_image_steps", "resolution", "mixed_precision", "device",
              "neurons", "checkpoint_every", "attention_slicing")
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    if args.no_regularizer:
        overrides["regularize"] = False
    if args.gradient_checkpointing:
        overrides["gradient_checkpointing"] = True
    return learn_settings(defaults or LearnConfig(), getattr(args, "method", None), overrides)


def cmd_init(args) -> int:
    from .library import ConceptLibrary, read_prompt_file

    prompts = read_prompt_file(args.calibration) if args.calibration else None
    library = ConceptLibrary.create(args.library, args.model, revision=args.revision, calibration_prompts=prompts)
    print(f"created concept library {library.path} on {library.base_model['name_or_path']} "
          f"({len(library.base_model['layers'])} cross-attention K/V layers)")
    recommended = library.manifest.get("learn_defaults") or {}
    if recommended:
        print("learning defaults from the model's cns_settings.json: "
              + ", ".join(f"{k} {v}" for k, v in recommended.items()))
    return 0


def cmd_learn(args) -> int:
    from .captions import TransformersCaptioner
    from .library import ConceptLibrary, ConceptSpec, read_prompt_file

    library = ConceptLibrary(args.library)
    if args.concepts_list:
        if args.images or args.class_word or args.token or args.captions:
            raise CNSError("give either --concepts-list or --images/--class-word, not both")
        specs = ConceptSpec.from_concepts_list(args.concepts_list)
    else:
        if not args.images or not args.class_word:
            raise CNSError("learn needs --images DIR and --class-word WORD (or --concepts-list FILE)")
        specs = [ConceptSpec(images=args.images, class_word=args.class_word, token=args.token,
                             captions_file=args.captions, class_data_dir=args.class_images)]
    captioner = TransformersCaptioner(args.captioner) if args.captioner else None
    prompts = read_prompt_file(args.calibration) if args.calibration else None
    records = library.learn(specs, _learn_config(args, library.default_config()), captioner=captioner,
                            calibration_prompts=prompts,
                            progress=not args.quiet)
    for record in records:
        report = record["selection"]
        print(f"learned {record['token']} ({record['class_word']}): {record['neurons']} concept neurons "
              f"({record['density']:.3%} of K/V; base {report['density']['base']:.2%}, "
              f"general {report['density']['general']:.2%}, overlap with earlier "
              f"{report['overlap_share_of_concept']:.1%}); captions: {record['caption_source']}")
    return 0


def cmd_generate(args) -> int:
    from .generate import check_output_files, image_grid, save_images
    from .library import ConceptLibrary

    out = Path(args.out)
    names = [f"{args.seed + i:05d}.png" for i in range(args.n)] + ["grid.png"]
    check_output_files(out, names, overwrite=args.force)  # before any drawing
    library = ConceptLibrary(args.library)
    images = library.generate(args.prompt, n=args.n, steps=args.steps, guidance=args.guidance, seed=args.seed,
                              height=args.height, width=args.width, negative_prompt=args.negative_prompt,
                              device=args.device)
    parameters = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
                  "guidance": args.guidance, "library": str(library.path)}
    save_images(out, dict(zip(names, [*images, image_grid(images)])), parameters, seed=args.seed,
                overwrite=args.force)
    print(f"wrote {len(images)} images and grid.png to {out}")
    return 0


def _refuse_damaged(library, problems: list[str]) -> None:
    """Print each problem on stdout, then fail with one error line."""
    if not problems:
        return
    for problem in problems:
        print(f"problem: {problem}")
    raise CNSError(f"library {library.path} failed its integrity check: {len(problems)} problem(s), first: "
                   f"{problems[0]}; `cns check {library.path} --repair` sets the damaged task(s) aside")


def cmd_check(args) -> int:
    from .library import ConceptLibrary

    library = ConceptLibrary(args.library)
    if args.repair:
        records = library.repair()
        for r in records:
            print(f"set aside task {r['task']} ({', '.join(r['tokens']) or 'no tokens'}) to {library.path / r['moved_to']}: "
                  f"{r['problems'][0]}")
            if r["later_tokens_kept"]:
                print(f"  kept {', '.join(r['later_tokens_kept'])}, learned after it: they keep their own values, "
                      "but were trained with it in the model (relearn one if it no longer looks right)")
        if not records:
            print("nothing to repair")
    _refuse_damaged(library, library.verify(check_base=args.base))
    files = sum(len(t.get("files", {})) for t in library.tasks)
    print(f"library {library.path} is sound: format {library.manifest['format_version']}, {len(library.tasks)} "
          f"task(s), {len(library.tokens)} concept(s), {files} files match their checksums"
          + (", base model matches" if args.base else ""))
    return 0


def cmd_show(args) -> int:
    from .library import ConceptLibrary

    library = ConceptLibrary(args.library)
    _refuse_damaged(library, library.verify())
    summary = library.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"library {summary['library']} (format {summary['format_version']}) on {summary['base_model']}")
    print(f"K/V untouched: {summary['kv_untouched_fraction']:.2%} of {summary['kv_elements']:,} weights")
    if not summary["concepts"]:
        print("no concepts yet: add one with `cns learn`")
        return 0
    print(f"{'token':<12} {'class':<12} {'images':>6} {'neurons':>9} {'density':>8} {'overlap':>8} "
          f"{'moved generic':>14} {'moved earlier':>14}")
    for c in summary["concepts"]:
        moved = [f"{100 * c['drift'][k]:.1f}%" if k in c.get("drift", {}) else "–" for k in ("generic", "earlier_tokens")]
        print(f"{c['token']:<12} {c['class_word']:<12} {c['images']:>6} {c['neurons']:>9,} "
              f"{c['density']:>8.3%} {c['overlap_with_earlier']:>8,} {moved[0]:>14} {moved[1]:>14}")
    print("moved: how far the concept's task changed the keys and values of generic prompts (the calibration "
          "prompts) and of earlier concepts' tokens, relative to what they were")
    return 0


def cmd_remove(args) -> int:
    from .library import ConceptLibrary

    library = ConceptLibrary(args.library)
    records = library.remove(args.tokens)
    for r in records:
        if r["later_tokens_kept"]:
            why = (f"no later task trained any of its K/V elements, so they return to their values before it; "
                   f"{', '.join(r['later_tokens_kept'])} keep their own values")
        else:
            why = "it was the last task: the library is as it was before it"
        print(f"took back {', '.join(r['tokens'])} (task {r['task']}), moved to {library.path / r['moved_to']}: {why}")
    return 0


def cmd_export(args) -> int:
    from .library import ConceptLibrary

    out = ConceptLibrary(args.library).export(args.out)
    print(f"exported a diffusers pipeline to {out}: StableDiffusionPipeline.from_pretrained({str(out)!r})")
    return 0


def cmd_demo(args) -> int:
    from .world.demo import DEFAULT_DEMO_CONCEPTS, DemoSettings, run_demo

    settings = DemoSettings(out=Path(args.out), concepts=tuple(args.concepts or DEFAULT_DEMO_CONCEPTS), seed=args.seed,
                            method=args.method)
    for field in ("guidance", "images_per_prompt", "sample_steps", "model", "evaluator"):
        if getattr(args, field, None) is not None:
            setattr(settings, field, getattr(args, field))
    settings.learn = {f: getattr(args, f) for f in ("steps", "lr_neurons", "lr_embedding", "select_ratio",
                                                     "lambda_keep", "lambda_generic", "lambda_refit")
                      if getattr(args, f, None) is not None}
    results = run_demo(settings, progress=not args.quiet)
    for c in results["concepts"]:
        print(f"{c['token']:<8} {c['name']:<14} {c['kind']:<9} CLIP-I {c['before']['clip_i']:.3f} -> "
              f"{c['after']['clip_i']:.3f}   CLIP-T {c['after']['clip_t']:.3f}   learned in {c['learn_seconds']:.0f} s")
    for m in results["multi"]:
        print(f"multi: {m['prompt']}\n       CLIP-I {m['clip_i']:.3f}  CLIP-T {m['clip_t']:.3f}")
    print(f"demo finished in {results['seconds']:.0f} s: open {Path(args.out) / 'report.md'}")
    return 0


def cmd_world(args) -> int:
    """Pass-through to the tiny world's own commands."""
    import importlib

    module = importlib.import_module(f"cns.world.{args.tool}")
    return int(module.main(args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cns", description="Continual personalization of Stable Diffusion with "
                                     "Concept Neuron Selection (CNS).")
    parser.add_argument("--version", action="version", version=f"cns {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="start a concept library on a base model")
    p.add_argument("library")
    p.add_argument("--model", required=True,
                   help="diffusers pipeline folder, hub id (e.g. a SD-1.5 repo), or tiny-world (the shipped model); "
                        "a cns_settings.json beside its model_index.json gives the library its learning defaults")
    p.add_argument("--revision")
    p.add_argument("--calibration", help="file of calibration prompts (one a line) for general neurons")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("learn", help="learn a new concept (or several, from a concepts_list JSON)")
    p.add_argument("library")
    p.add_argument("--images", help="folder of 1-6 images of the concept")
    p.add_argument("--class-word", help="what the concept is: dog, hat, painting, ...")
    p.add_argument("--token", help="its token, e.g. <my-dog> (default: next free <newK>)")
    p.add_argument("--captions", help="caption file: JSON {file: caption} or lines 'file<TAB>caption'")
    p.add_argument("--captioner", help="image-to-text model (folder or hub id) to caption the images")
    p.add_argument("--class-images", help="folder of class images for prior preservation (default: generated)")
    p.add_argument("--concepts-list", help="diffusers Custom Diffusion concepts_list JSON")
    p.add_argument("--calibration", help="file of calibration prompts replacing the library's")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--select-ratio", type=float)
    p.add_argument("--select-rule", choices=["top_ratio_per_row", "quantile_per_layer", "threshold"])
    p.add_argument("--neurons", choices=["concept", "random", "all"], help="which K/V elements to train")
    p.add_argument("--lr-embedding", type=float)
    p.add_argument("--lr-neurons", type=float)
    p.add_argument("--lambda-previous", type=float)
    p.add_argument("--lambda-pretrained", type=float)
    p.add_argument("--no-regularizer", action="store_true", help="ablation: no L_reg")
    p.add_argument("--lambda-keep", type=float,
                   help="beyond the paper: weight of L_keep, which holds the keys and values of earlier "
                        "concepts' tokens (0, the default: off; 10 is a good start)")
    p.add_argument("--method", choices=["default", "paper"], default="default",
                   help="default: the library's settings (the model's recommended ones); paper: the paper's CNS "
                        "(Eq. 7-8 only: no L_keep, no L_generic), other settings as the library's")
    p.add_argument("--lambda-generic", type=float,
                   help="beyond the paper: weight of L_generic, which holds the keys and values of generic prompts "
                        "(the library's calibration prompts): zero-shot ability and the prompt's other words")
    p.add_argument("--lambda-lock", type=float,
                   help="beyond the paper (after Perfusion): weight of L_lock, which holds a new token's keys at its "
                        "class word's so that only its values carry the concept (0, the default: off)")
    p.add_argument("--lambda-refit", type=float,
                   help="beyond the paper: after training, refit each trained K/V row in closed form to keep what it "
                        "does to the concept's text and hold what it does to the calibration prompts, with this "
                        "weight on the latter (cns.refit; 0, the default: off)")
    p.add_argument("--generic-padding", action=argparse.BooleanOptionalAction, default=None,
                   help="whether L_generic also holds the padding positions of the generic prompts (default: yes)")
    p.add_argument("--prior-loss-weight", type=float)
    p.add_argument("--num-class-images", type=int)
    p.add_argument("--class-image-steps", type=int)
    p.add_argument("--resolution", type=int)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                   help="autocast training through accelerate (bf16 also on CPU): less memory")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the UNet's activations in the backward pass: less memory, slower steps")
    p.add_argument("--attention-slicing", choices=["no", "auto", "max"],
                   help="diffusers' sliced attention in the UNet while training; with torch >= 2 it costs memory "
                        "and time against the default attention (docs/performance.md)")
    p.add_argument("--device")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="save a checkpoint every N steps; running the same learn again resumes from it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("generate", help="generate images with learned tokens")
    p.add_argument("library")
    p.add_argument("prompt")
    p.add_argument("-n", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--negative-prompt")
    p.add_argument("--device", help="cpu, cuda, ... (default: a GPU when there is one)")
    p.add_argument("--out", required=True, help="folder for the images (NNNNN.png by seed, and grid.png)")
    p.add_argument("--force", action="store_true",
                   help="replace images an earlier `cns generate` wrote there (never any other file)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("show", help="list concepts, neuron counts, overlaps")
    p.add_argument("library")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("check", help="verify a library's files: versions, checksums, shapes, masks vs values")
    p.add_argument("library")
    p.add_argument("--base", action="store_true", help="also load the base model and confirm it is the library's")
    p.add_argument("--repair", action="store_true",
                   help="move each damaged task aside into LIB/damaged/ (never deleted) so the rest works again")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("remove", help="take back a learned concept (its task), moved aside into LIB/removed/")
    p.add_argument("library")
    p.add_argument("tokens", nargs="+", metavar="TOKEN",
                   help="the concept's token; the last task can always be taken back, an earlier one when no later "
                        "task shares its K/V elements")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("demo", help="the tiny world demo: learn concepts one after another, draw, measure")
    p.add_argument("--out", default="cns-demo",
                   help="folder for the report, images and library (default: cns-demo). It must be new or "
                   "empty, or one an earlier demo wrote: then that demo's files (listed in its .cns-demo.json) "
                   "are replaced and nothing else is touched; a folder with files cns did not make is refused")
    p.add_argument("--concepts", nargs="+", help="tiny-world concept names (default: an object, a scene, a style, "
                   "a creature)")
    p.add_argument("--method", choices=["default", "paper"], default="default",
                   help="default: what `cns learn` does with no flags (the model's recommended settings); paper: "
                        "the paper's CNS (Eq. 7-8, nothing beyond it)")
    p.add_argument("--steps", type=int, help="training steps per concept (default: the model's)")
    p.add_argument("--lr-neurons", type=float, help="learning rate of the selected K/V elements")
    p.add_argument("--lr-embedding", type=float, help="learning rate of the new tokens' embeddings")
    p.add_argument("--select-ratio", type=float, help="share of each K/V row selected per caption (Sec. 4.2)")
    p.add_argument("--lambda-keep", type=float,
                   help="beyond the paper: weight of L_keep, which holds earlier concepts' keys and values")
    p.add_argument("--lambda-generic", type=float,
                   help="beyond the paper: weight of L_generic, which holds generic prompts' keys and values")
    p.add_argument("--lambda-refit", type=float,
                   help="beyond the paper: refit each task's K/V update against generic prompts (cns.refit)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--images-per-prompt", type=int)
    p.add_argument("--sample-steps", type=int)
    p.add_argument("--model", help="tiny-world model folder (default: the shipped one)")
    p.add_argument("--evaluator", help="CLIP evaluator folder (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("world", help="tiny world tools: concepts, pretrain, evaluator")
    p.add_argument("tool", choices=["concepts", "pretrain", "evaluator"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("export", help="write a plain diffusers pipeline folder with every concept")
    p.add_argument("library")
    p.add_argument("out")
    p.set_defaults(func=cmd_export)
    register_evaluate(sub)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _hide_loading_bars() -> None:
    """No "Loading pipeline components" / "Loading weights" bars on stderr (they would also
    break the one-line errors); the hub's download bars stay."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    downloads_hidden = are_progress_bars_disabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # this hides the hub's download bars too:
    if not downloads_hidden:
        enable_progress_bars()  # so show them again


def _warning_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command as typed, for reports
    _quiet_libraries()
    if args.command != "show" and not (args.command == "check" and not args.base):  # the commands that load a model
        _hide_loading_bars()
    warnings.showwarning = _warning_line
    try:
        return args.func(args)
    except CNSError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the library is unchanged", file=sys.stderr)
        return 130
    except OSError as exc:  # a file the command needed, named with the system's reason
        if args.debug:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot use{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the last resort: never a traceback for users; --debug shows it
        if args.debug:
            raise
        text = str(exc).strip().splitlines()
        print(f"error: {type(exc).__name__}: {text[0] if text else 'unexpected failure'} (rerun with --debug)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
