"""`afgpt compare`: train a grid of activation (x feed-forward) variants over several seeds under identical
conditions, and tell which differences from a baseline are larger than the seed-to-seed noise.

Every variant x seed is one `afgpt train` run in <output_dir>/runs/<variant>/seed<k>; the runs share every setting
but af_type, ffn_type, seed and output_dir (and, with --match-params, the MLP width), so seed k gives every variant
the same initialisation seed and the same data order (TrainConfig.seed drives both). A variant written
"<spec>@stage2" learns its activations in a stage I first (--n-models replicas) and reports a fresh model trained
with them frozen (stage II). compare.json records the grid (grid.py); the runs are trained here (runner.py, which
skips finished runs, resumes interrupted ones and runs --jobs side by side) or by a scheduler from the commands
--plan writes; the table is always built from the run directories (results.py).
"""
import argparse
import json

from ..training.config import FAMILIES, SIZES
from .grid import CompareGrid, Variant, build_grid, comma_list, run_status
from .results import collect, paired_difference
from .runner import plan, run_grid

__all__ = ["CompareGrid", "Variant", "build_grid", "collect", "comma_list", "paired_difference", "plan",
           "run_grid", "run_status", "build_compare_parser"]


def parse_overrides(items: list[str]) -> dict:
    """--set NAME=VALUE pairs; VALUE is read as JSON when it parses (numbers, true/false, [low, high]), else text."""
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE, e.g. learning_rate=1e-3")
        try:
            overrides[name.strip().replace("-", "_")] = json.loads(text)
        except ValueError:
            overrides[name.strip().replace("-", "_")] = text
    return overrides


def evaluations_from(args: argparse.Namespace) -> dict:
    """The grid's evaluations from --blimp and --superglue (and their settings)."""
    from ..evaluation.finetune import SUPERGLUE_TASKS  # Trainer loads only when asked for

    evaluations = {}
    if args.blimp:
        evaluations["blimp"] = {"data": args.blimp, "limit": args.blimp_limit}
    if args.superglue:
        tasks = comma_list(args.superglue_tasks) if args.superglue_tasks else list(SUPERGLUE_TASKS)
        evaluations["superglue"] = {"data": args.superglue, "tasks": tasks, "preset": args.superglue_preset}
    return evaluations


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """`afgpt compare` flags."""
    from ..evaluation.finetune import PRESETS

    parser.add_argument("--af", dest="af_types", required=False,
                        help="comma-separated activation specs, e.g. 'relu;att-linear,gelu;att-linear'; a spec "
                             "ending in @stage2 learns its activations in a stage I first and reports stage II")
    parser.add_argument("--ffn", dest="ffn_types", default="mlp",
                        help="comma-separated feed-forwards (mlp,glu,moa,moa_glu,kan): the grid is --af x --ffn")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; seed k gives every variant the same "
                                                         "data order and initialisation seed")
    parser.add_argument("--output-dir", required=True, help="runs/<variant>/seed<k>, results.json/.md, "
                                                            "val_curves.png")
    parser.add_argument("--model", default="afgpt", choices=FAMILIES, help="model family")
    parser.add_argument("--preset", default=None, choices=tuple(SIZES), help="model size preset (TrainConfig --size)")
    parser.add_argument("--data", default=None, help="training data (default: TrainConfig's)")
    parser.add_argument("--baseline", default=None, help="the variant differences are measured against (its af spec; "
                                                         "default: the first)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps of every run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="any other TrainConfig field for every run, e.g. --set learning_rate=1e-3 (repeatable)")
    parser.add_argument("--match-params", action="store_true",
                        help="give each variant the MLP width (intermediate_size) whose non-embedding parameter "
                             "count is closest to the baseline's; the table reports the widths")
    parser.add_argument("--n-models", type=int, default=4,
                        help="@stage2 variants: stage I replicas (default 4; the thesis used 20)")
    parser.add_argument("--staggered-starts", type=int, default=2, choices=(0, 1, 2),
                        help="@stage2 variants: stage I's staggered starts (TrainConfig --staggered-starts)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained side by side, each with 1/jobs of the "
                                                            "threads (for machines with more cores than one run uses)")
    parser.add_argument("--blimp", default=None, metavar="DIR",
                        help="also score every finished model on BLiMP (a folder of .jsonl files) for a column")
    parser.add_argument("--blimp-limit", type=int, default=None, help="--blimp: first N pairs per paradigm")
    parser.add_argument("--superglue", default=None, metavar="DIR",
                        help="also fine-tune every finished model on SuperGLUE (data root with superglue/<Task>/) for "
                             "a column: the mean over tasks")
    parser.add_argument("--superglue-tasks", default=None, help="--superglue: comma-separated tasks (default: all)")
    parser.add_argument("--superglue-preset", default="full", choices=tuple(PRESETS),
                        help="--superglue: fine-tuning preset (quick: a smoke test, not comparable to full runs)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print one command line per run (commands.txt, and "
                                                          "commands_stage1.txt to run first) instead of training")
    mode.add_argument("--collect", action="store_true", help="only build the table from the finished run directories")


def run_compare(args: argparse.Namespace) -> None:
    """`afgpt compare`: train (or plan, or collect) the grid."""
    if args.collect:
        collect(args.output_dir)
        return
    if not args.af_types:
        raise ValueError("--af is required (comma-separated activation specs), except with --collect")
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: give at least 1")
    grid = build_grid(args.af_types, args.output_dir, seeds=args.seeds, ffn_types=args.ffn_types, model=args.model,
                      preset=args.preset, data=args.data, baseline=args.baseline, max_steps=args.max_steps,
                      overrides=parse_overrides(args.overrides), n_models=args.n_models,
                      staggered_starts=args.staggered_starts, match_params=args.match_params,
                      evaluations=evaluations_from(args))
    if args.plan:
        plan(grid)
    else:
        run_grid(grid, args.jobs)


def build_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `compare` to afgpt's subcommands (cli.build_parser's `commands`)."""
    parser = subparsers.add_parser("compare", help="train activation variants x seeds under identical conditions "
                                                   "and report which differences from the baseline are real")
    add_compare_arguments(parser)
    parser.set_defaults(run=run_compare)
    return parser
