"""The `afgpt` command: `afgpt train`, `afgpt prepare`.

`afgpt train` flags are TrainConfig's fields with dashes (named like transformers.TrainingArguments
where one exists): `--output-dir`, `--max-steps`, `--learning-rate`, `--af-type`, ...
"""
import argparse
import dataclasses
import sys
import types
import typing
from datetime import datetime

from . import data as data_lib
from .training import TrainConfig, train

HELP = {
    "data": "text file/dir (.txt/.jsonl/.json[.gz]), a Hugging Face dataset name, 'builtin:pydoc', "
            "or a glob of .bin token shards",
    "tokenizer": "tokenizer folder or Hub name (default: train a byte-level BPE of --vocab-size on the data)",
    "af_type": "activation spec '<mlp>;att-<att>', e.g. 'gelu;att-linear' or 'spline;att-spline'",
    "af_lr": "activation learning rate: > 0 Adam, < 0 SGD with |af_lr|, 0 frozen",
    "lr_scheduler_type": "trap (warmup, constant, linear cooldown), warmup, or cos",
    "mixed_precision": "'no' or 'bf16'",
    "max_grad_norm": "gradient clipping norm (0 = off)",
}


def _field_type(field: dataclasses.Field) -> type:
    """The concrete type of a TrainConfig field (the X of `X | None`)."""
    kind = field.type
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return kind


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = _field_type(field)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=HELP.get(field.name))
        else:
            parser.add_argument(flag, type=kind, default=field.default, help=HELP.get(field.name),
                                metavar=field.name.upper())
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")


def run_train(args: argparse.Namespace) -> None:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if args.output_dir == TrainConfig.output_dir and not args.resume:
        values["output_dir"] = f"runs/{datetime.now():%Y%m%d-%H%M%S}"
    train(TrainConfig(**values), resume=args.resume, overwrite=args.overwrite)


def run_prepare(args: argparse.Namespace) -> None:
    tokenizer = (data_lib.load_tokenizer(args.tokenizer) if args.tokenizer else
                 data_lib.train_tokenizer(data_lib.iter_texts(args.data, args.text_field), args.vocab_size))
    paths = data_lib.prepare(data_lib.iter_texts(args.data, args.text_field), tokenizer, args.output_dir,
                             val_tokens=args.val_tokens, shard_size=args.shard_size, prefix=args.prefix)
    print(f"wrote {len(paths)} shards and the tokenizer to {args.output_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afgpt", description="Activation-function research on small LMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser("train", help="train an AfGPT model (default: small model, built-in corpus)",
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(train_parser)
    train_parser.set_defaults(run=run_train)

    prepare = commands.add_parser("prepare", help="tokenize a corpus into llm.c/lm-afs .bin token shards",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    prepare.add_argument("--data", default=data_lib.BUILTIN_PYDOC, help=HELP["data"])
    prepare.add_argument("--text-field", default="text")
    prepare.add_argument("--tokenizer", default=None, help=HELP["tokenizer"])
    prepare.add_argument("--vocab-size", type=int, default=TrainConfig.vocab_size)
    prepare.add_argument("--output-dir", required=True)
    prepare.add_argument("--val-tokens", type=int, default=TrainConfig.val_tokens)
    prepare.add_argument("--shard-size", type=int, default=100_000_000)
    prepare.add_argument("--prefix", default="corpus")
    prepare.set_defaults(run=run_prepare)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, FloatingPointError) as error:
        sys.exit(f"afgpt {args.command}: error: {error}")


if __name__ == "__main__":
    main()
