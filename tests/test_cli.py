"""The `afgpt` command line: every `afgpt train` flag explains itself."""
import argparse
import dataclasses

import pytest

from afgpt import cli
from afgpt.training import TrainConfig


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afgpt train", formatter_class=cli.DefaultsHelpFormatter)
    cli.add_train_arguments(parser)
    return parser


def test_every_train_flag_has_help_that_gives_its_default():
    parser = train_parser()
    formatter = parser._get_formatter()
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert len(actions) == len(dataclasses.fields(TrainConfig)) + 2  # + --resume, --overwrite
    for action in actions:
        assert action.help and action.help.strip(), action.option_strings
        shown = formatter._get_help_string(action)
        assert "%(default)s" in shown or "default" in action.help, action.option_strings  # None: the text says


def test_train_help_prints(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--max-steps MAX_STEPS optimizer steps" in out and "(default: 200)" in out
    assert "10% of --max-steps" in out and "(default: None)" not in out
