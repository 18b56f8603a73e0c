"""The `afgpt` command: `afgpt train`, `afgpt prepare`, `afgpt plot`, `afgpt push`, `afgpt eval-blimp`,
`afgpt eval-superglue`, `afgpt compare`.

`afgpt train` flags are TrainConfig's fields with dashes (named like transformers.TrainingArguments
where one exists): `--output-dir`, `--max-steps`, `--learning-rate`, `--af-type`, ...
"""
import argparse
import dataclasses
import json
import sys
import types
import typing
from datetime import datetime
from pathlib import Path

from . import data as data_lib
from .atomic import write_text_atomically
from .bank import plot_activation_file
from .compare import build_compare_parser, comma_list
from .evaluation.pll import PLL_METHODS
from .hub import HubError, push_run
from .training import RESUMABLE_FIELDS, TrainConfig, train

TRAIN_FIELDS = {field.name: field for field in dataclasses.fields(TrainConfig)}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default; a None or empty default is left to the help text, which says what unset means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default in (None, "") else super()._get_help_string(action)


def field_help(name: str) -> str:
    """A TrainConfig field's help text, escaped for argparse (which formats it with %)."""
    return TRAIN_FIELDS[name].metadata["help"].replace("%", "%%")


def _field_type(field: dataclasses.Field) -> type:
    """The concrete type of a TrainConfig field (the X of `X | None`; tuple for `tuple[float, float]`)."""
    kind = field.type
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return typing.get_origin(kind) or kind


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with the help text and default written next to the field."""
    for field in TRAIN_FIELDS.values():
        flag = "--" + field.name.replace("_", "-")
        kind = _field_type(field)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=field_help(field.name))
        elif kind is tuple:  # a pair of floats: --kan-grid-range LOW HIGH
            parser.add_argument(flag, type=float, nargs=2, default=field.default, help=field_help(field.name),
                                metavar=("LOW", "HIGH"))
        else:
            parser.add_argument(flag, type=kind, default=field.default, help=field_help(field.name),
                                metavar=field.name.upper())
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its checkpoint; only " +
                             ", ".join("--" + name.replace("_", "-") for name in RESUMABLE_FIELDS) +
                             " may differ from the run's train_config.json (a finished run is left as it is)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")


def run_train(args: argparse.Namespace) -> None:
    values = {name: getattr(args, name) for name in TRAIN_FIELDS}
    if args.output_dir == TrainConfig.output_dir and not args.resume:
        values["output_dir"] = f"runs/{datetime.now():%Y%m%d-%H%M%S}"
    train(TrainConfig(**values), resume=args.resume, overwrite=args.overwrite)


def run_prepare(args: argparse.Namespace) -> None:
    tokenizer = (data_lib.load_tokenizer(args.tokenizer) if args.tokenizer else
                 data_lib.train_tokenizer(data_lib.iter_texts(args.data, args.text_field), args.vocab_size))
    paths = data_lib.prepare(data_lib.iter_texts(args.data, args.text_field), tokenizer, args.output_dir,
                             val_tokens=args.val_tokens, shard_size=args.shard_size, prefix=args.prefix)
    print(f"wrote {len(paths)} shards, the tokenizer and {data_lib.TOKENS_FILE} to {args.output_dir}")


def run_plot(args: argparse.Namespace) -> None:
    hints = {k: v for k, v in (("num_hidden_layers", args.num_hidden_layers), ("af_type", args.af_type)) if v is not None}
    path = Path(args.path)
    output = args.output or (path.with_suffix(".png") if path.is_file() else path / "activations.png")
    print(f"wrote {plot_activation_file(args.path, output, **hints)}")


def run_push(args: argparse.Namespace) -> None:
    url = push_run(args.run_dir, args.repo_id, token=args.token, private=args.private,
                   include_model=args.include_model, baseline_val_loss=args.baseline_val_loss)
    print(f"pushed {args.run_dir} to {url}")


def run_eval_blimp(args: argparse.Namespace) -> None:
    from .evaluation.blimp import evaluate_models, markdown_table, save_pairs  # scoring loads when asked for
    from .plotting import plot_blimp

    results = evaluate_models(args.models, args.data, args.paradigms, args.limit, args.batch_size, pll=args.pll,
                              return_pairs=args.save_pairs is not None)
    print(markdown_table(results))
    if args.save_pairs:
        print(f"wrote {save_pairs(results, args.save_pairs)}")
        for result in results.values():
            del result["pair_scores"]
    if args.output:
        settings = {"data": args.data, "paradigms": args.paradigms, "limit": args.limit, "pll": args.pll}
        write_text_atomically(Path(args.output), json.dumps({"settings": settings, "models": results}, indent=2))
        print(f"wrote {args.output}")
    plot = args.plot or (Path(args.output).with_suffix(".png") if args.output else None)
    if plot:
        plot_blimp(results, plot)
        print(f"wrote {plot}")


def superglue_output_dir(model: str) -> Path:
    """Where predictions go by default: inside a local model folder (a run keeps its evaluations), else ./superglue/."""
    return Path(model) / "superglue" if Path(model).is_dir() else Path("superglue") / model.replace("/", "--")


def run_eval_superglue(args: argparse.Namespace) -> None:
    from .evaluation.finetune import FinetuneSettings, evaluate_superglue, results_table  # loads Trainer when asked

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneSettings)
                 if getattr(args, f.name) is not None}
    output_dir = Path(args.output_dir) if args.output_dir else superglue_output_dir(args.model)
    results = evaluate_superglue(args.model, args.data, output_dir, comma_list(args.tasks), args.preset,
                                 [int(seed) for seed in comma_list(args.seeds)], overrides)
    print(results_table(results))
    print(f"wrote {output_dir / 'results.json'} and each task's predictions.jsonl under {output_dir}")
    if args.output:
        write_text_atomically(Path(args.output), json.dumps(results, indent=2))
        print(f"wrote {args.output}")


def add_superglue_arguments(parser: argparse.ArgumentParser) -> None:
    from .evaluation.finetune import PRESETS, SUPERGLUE_TASKS, FinetuneSettings

    parser.add_argument("model", help="model folder (an `afgpt train` run, whose metrics.jsonl gets the results; a "
                                      "patched or plain GPT-Neo/RoBERTa) or Hub id, with its tokenizer")
    parser.add_argument("--data", required=True, help="data root holding superglue/<Task>/ and glue/<Task>/, "
                                                      "e.g. ../shared/data")
    parser.add_argument("--tasks", default=",".join(SUPERGLUE_TASKS),
                        help="comma-separated: boolq,cb,copa,multirc,rte,wic,wsc and GLUE's cola,sst2,mrpc,"
                             "glue-rte,stsb,wnli")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="full",
                        help="full: the BabyLM pipeline's settings; quick: capped data and 2 epochs, a smoke test "
                             "whose numbers are not comparable to full runs")
    parser.add_argument("--seeds", default="12", help="comma-separated training seeds; several give mean and std")
    parser.add_argument("--output-dir", default=None,
                        help="predictions and results.json (default: MODEL/superglue for a folder)")
    parser.add_argument("--output", default=None, help="also write the results JSON here")
    for field in dataclasses.fields(FinetuneSettings):  # each overrides the preset's value
        flag = "--" + field.name.replace("_", "-")
        if field.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help="keep the learned activations fixed while fine-tuning (default: the preset's, "
                                     "trainable)")
        else:
            kind = float if "float" in str(field.type) else int
            parser.add_argument(flag, type=kind, default=None, metavar=field.name.upper(),
                                help=f"default: the preset's (full: {field.default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afgpt", description="Activation-function research on small LMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser("train", help="train an AfGPT, GPT-Neo or RoBERTa model (default: a small "
                                                     "AfGPT, built-in corpus)",
                                       formatter_class=DefaultsHelpFormatter)
    add_train_arguments(train_parser)
    train_parser.set_defaults(run=run_train)

    prepare = commands.add_parser("prepare", help="tokenize a corpus into llm.c/lm-afs .bin token shards",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    prepare.add_argument("--data", default=data_lib.BUILTIN_PYDOC, help=field_help("data"))
    prepare.add_argument("--text-field", default="text", help=field_help("text_field"))
    prepare.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub name (default: train a "
                                                           "byte-level BPE of --vocab-size tokens on the data)")
    prepare.add_argument("--vocab-size", type=int, default=TrainConfig.vocab_size, help=field_help("vocab_size"))
    prepare.add_argument("--output-dir", required=True,
                         help="folder for the shards, the tokenizer and tokens.json (its separator and vocabulary)")
    prepare.add_argument("--val-tokens", type=int, default=TrainConfig.val_tokens, help=field_help("val_tokens"))
    prepare.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per training shard")
    prepare.add_argument("--prefix", default="corpus",
                         help="shard names: PREFIX_val_000000.bin, PREFIX_train_000001.bin, ...")
    prepare.set_defaults(run=run_prepare)

    plot = commands.add_parser("plot", help="plot learned activations (afgpt bank/run dir, lm-afs ptAf .pt/.csv)")
    plot.add_argument("path", help="activation bank directory, run directory, or lm-afs ptAf-*.pt / ptAf-*.csv file")
    plot.add_argument("--output", "-o", default=None,
                      help="PNG to write (default: activations.png in a directory, <name>.png for a file)")
    plot.add_argument("--num-hidden-layers", type=int, default=None, help="hint for lm-afs CSV files")
    plot.add_argument("--af-type", default=None, help="hint for lm-afs CSV files, e.g. 'spline;att-spline'")
    plot.set_defaults(run=run_plot)

    push = commands.add_parser("push", help="push a run's learned activations (and optionally the model) to the Hub")
    push.add_argument("run_dir")
    push.add_argument("repo_id")
    push.add_argument("--include-model", action="store_true", help="also push the model with its code and tokenizer")
    push.add_argument("--private", action="store_true")
    push.add_argument("--baseline-val-loss", type=float, default=None,
                      help="the baseline's final val loss, for the model card's comparison")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    push.set_defaults(run=run_push)

    blimp = commands.add_parser("eval-blimp", help="BLiMP accuracy: causal LMs scored as lm-evaluation-harness does, "
                                                   "masked LMs by pseudo-log-likelihood as minicons does",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    blimp.add_argument("models", nargs="+", help="model folders (e.g. an `afgpt train` run, whose metrics.jsonl gets "
                                                 "the results) or Hub ids; one column each")
    blimp.add_argument("--data", required=True, help="folder of BLiMP .jsonl(.gz) files, e.g. ../shared/data/blimp")
    blimp.add_argument("--paradigms", default=None, help="comma-separated paradigms (default: all)")
    blimp.add_argument("--limit", type=int, default=None, help="first N pairs per paradigm (default: all)")
    blimp.add_argument("--batch-size", type=int, default=64, help="sentences (masked LMs: masked copies) per forward")
    blimp.add_argument("--pll", choices=PLL_METHODS, default="original",
                       help="masked LMs: pseudo-log-likelihood of Salazar et al. 2020 (original) or Kauf & Ivanova "
                            "2023 (within_word_l2r: also masks the later sub-tokens of the word)")
    blimp.add_argument("--output", default=None, help="JSON file for the results, with a bar plot next to it "
                                                      "(default: print only)")
    blimp.add_argument("--plot", default=None, help="PNG bar plot per phenomenon (default: --output's name, .png)")
    blimp.add_argument("--save-pairs", default=None, metavar="JSONL",
                       help="write every pair's log-probabilities (and whether it is right) to this file")
    blimp.set_defaults(run=run_eval_blimp)

    superglue = commands.add_parser("eval-superglue", help="fine-tune and score on SuperGLUE (and GLUE) tasks with "
                                                           "transformers.Trainer")
    add_superglue_arguments(superglue)
    superglue.set_defaults(run=run_eval_superglue)

    build_compare_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, FloatingPointError, HubError) as error:
        sys.exit(f"afgpt {args.command}: error: {error}")


if __name__ == "__main__":
    main()
