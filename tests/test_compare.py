"""afgpt compare: a grid of tiny runs, the paired statistics, skipping, resuming, failures, plan and collect."""
import argparse
import json
import math
import shlex
import statistics
from pathlib import Path

import pytest
import torch

from afgpt import compare
from afgpt.cli import TRAIN_FIELDS, build_parser
from afgpt.compare import (CompareGrid, build_grid, collect, paired_difference, parse_overrides, plan, run_grid,
                           run_status)
from afgpt.plotting import read_metrics
from afgpt.training import TrainConfig, TrainingDiverged, loop

TINY = dict(vocab_size=300, val_tokens=4096, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            per_device_train_batch_size=4, seq_length=32, logging_steps=2, eval_steps=2, eval_batches=2,
            save_steps=2, plotting_level=0)


def tiny_grid(output_dir, af_types="gelu;att-linear,relu;att-linear", seeds="0,1", **kwargs) -> CompareGrid:
    return build_grid(af_types, str(output_dir), seeds=seeds, max_steps=kwargs.pop("max_steps", 4),
                      overrides={**TINY, **kwargs.pop("overrides", {})}, **kwargs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-variant x 2-seed grid, trained once for the tests that read it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grid = tiny_grid(tmp_path_factory.mktemp("compare"))
        return grid, run_grid(grid)
    finally:
        torch.set_num_threads(threads)


def final_val_loss(run_dir) -> float:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "val"][-1]["loss"]


def test_a_grid_reports_per_seed_paired_differences_from_the_run_directories(finished):
    grid, results = finished
    out = Path(grid.output_dir)
    saved = json.loads((out / "results.json").read_text())
    assert [v["variant"] for v in saved["variants"]] == ["gelu;att-linear mlp", "relu;att-linear mlp"]
    base, relu = grid.variants
    d = [final_val_loss(grid.run_dir(relu, s)) - final_val_loss(grid.run_dir(base, s)) for s in (0, 1)]
    diff = results["variants"][1]["vs_baseline"]
    assert diff["d"] == pytest.approx(d)
    assert diff["mean"] == pytest.approx(statistics.fmean(d))
    assert diff["se"] == pytest.approx(statistics.stdev(d) / math.sqrt(2))
    assert diff["real"] == (abs(statistics.fmean(d)) > 2 * diff["se"])
    row = results["variants"][1]
    assert row["seeds_done"] == [0, 1] and row["errors"] == {} and row["params_flag"] == ""
    assert row["val_loss_std"] == pytest.approx(statistics.stdev(final_val_loss(grid.run_dir(relu, s))
                                                                 for s in (0, 1)))
    assert row["mlp_zero_frac"] > 0.2 > results["variants"][0]["mlp_zero_frac"]  # ReLU's outputs are sparse
    assert row["tokens_per_second"] > 0 and row["params_total"] > row["params_non_embedding"] > 0
    table = (out / "results.md").read_text()
    assert f"{diff['mean']:+.4f} ± {diff['se']:.4f}" in table and "| baseline | baseline |" in table
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines())
    assert (out / "val_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "compare.json").is_file()


def test_runs_with_the_same_seed_differ_only_in_the_variant(finished):
    grid, _ = finished
    base, relu = grid.variants
    for seed in grid.seeds:
        a, b = (json.loads((grid.run_dir(v, seed) / "train_config.json").read_text()) for v in (base, relu))
        assert {k for k in a if a[k] != b[k]} == {"af_type", "output_dir", "run_name"}
        assert a["seed"] == seed  # the seed that sets the data order and the initialisation
    tokenizers = {(grid.run_dir(v, s) / "tokenizer.json").read_bytes() for v, s in grid.runs()}
    assert len(tokenizers) == 1  # each run trains its BPE on the same data: the same tokens everywhere


def test_a_rerun_skips_finished_runs_and_collect_rebuilds_the_same_table(finished, monkeypatch):
    grid, results = finished
    out = Path(grid.output_dir)
    calls = []
    monkeypatch.setattr(compare, "train", lambda *args, **kwargs: calls.append(args))
    table = (out / "results.md").read_text()
    assert run_grid(grid) == results and calls == []
    (out / "results.md").unlink()
    assert collect(grid.output_dir) == results
    assert (out / "results.md").read_text() == table


def test_an_interrupted_run_is_resumed(tmp_path, monkeypatch, one_thread):
    grid = tiny_grid(tmp_path, af_types="gelu;att-linear", seeds="0", max_steps=6)
    real_step, steps = loop.train_step, {"n": 0}

    def killed_at_step_4(*args, **kwargs):
        steps["n"] += 1
        if steps["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid)
    run_dir = grid.run_dir(grid.variants[0], 0)
    assert run_status(run_dir, 6) == "partial"
    monkeypatch.setattr(loop, "train_step", real_step)
    seen = []
    real_train = compare.train
    monkeypatch.setattr(compare, "train", lambda cfg, **kw: seen.append(kw) or real_train(cfg, **kw))
    results = run_grid(grid)
    assert seen == [{"resume": True, "overwrite": False}]
    assert results["variants"][0]["seeds_done"] == [0] and run_status(run_dir, 6) == "done"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"] == [2, 4, 6]


def test_a_failing_variant_is_reported_and_the_others_complete(tmp_path, monkeypatch, one_thread):
    grid = tiny_grid(tmp_path, af_types="gelu;att-linear,relu;att-linear,prelu;att-linear", seeds="0")
    real_train = compare.train

    def diverging_relu(cfg, **kwargs):
        if cfg.af_type.startswith("relu"):
            raise TrainingDiverged("loss is nan at step 3")
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(compare, "train", diverging_relu)
    results = run_grid(grid)
    gelu, relu, prelu = results["variants"]
    assert relu["errors"] == {0: "TrainingDiverged: loss is nan at step 3"} and relu["seeds_done"] == []
    assert gelu["seeds_done"] == prelu["seeds_done"] == [0]
    assert prelu["vs_baseline"]["verdict"].startswith("n=1: no claim")  # one seed: no noise estimate
    assert prelu["params_flag"].startswith("params +")  # PReLU's learnable slopes
    assert prelu["params_flag"].endswith("% (non-embedding)")
    table = (tmp_path / "results.md").read_text()
    assert "seed 0 failed: TrainingDiverged: loss is nan at step 3" in table and "n=1: no claim" in table
    assert "no paired seeds" in table


def test_paired_difference_says_when_a_difference_is_real():
    base = {0: 3.0, 1: 3.1, 2: 2.9}
    worse = paired_difference({0: 3.10, 1: 3.22, 2: 2.99}, base)  # d = 0.10, 0.12, 0.09
    assert worse["real"] and worse["verdict"] == "real: worse (n=3)"
    assert worse["se"] == pytest.approx(statistics.stdev([0.10, 0.12, 0.09]) / math.sqrt(3))
    noisy = paired_difference({0: 3.1, 1: 3.0, 2: 2.9}, base)  # d = 0.1, -0.1, 0
    assert not noisy["real"] and noisy["verdict"] == "within noise (n=3)"
    single = paired_difference({0: 2.5}, base)
    assert single["real"] is None and single["se"] is None and "no claim" in single["verdict"]


def test_plan_prints_commands_afgpt_train_parses_into_each_runs_config(tmp_path, capsys):
    grid = tiny_grid(tmp_path, af_types="gelu;att-linear,relu;att-linear", ffn_types="mlp,kan", seeds="3,4",
                     overrides={"kan_grid_range": [-2.0, 2.0], "same_data_across_models": True})
    commands = plan(grid)
    assert len(commands) == 8 and capsys.readouterr().out.splitlines() == commands
    assert (tmp_path / "commands.txt").read_text().splitlines() == commands
    parser = build_parser()
    for command, (variant, seed) in zip(commands, grid.runs()):
        words = shlex.split(command)
        assert words[:2] == ["afgpt", "train"]
        args = parser.parse_args(words[1:])
        assert TrainConfig(**{name: getattr(args, name) for name in TRAIN_FIELDS}) == grid.config(variant, seed)
    assert CompareGrid.load(tmp_path) == grid  # collect() finds the grid the commands fill


def test_grid_settings_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown MLP activation 'reul'"):
        tiny_grid(tmp_path, af_types="gelu;att-linear,reul;att-linear")
    with pytest.raises(ValueError, match="seed: the comparison sets"):
        tiny_grid(tmp_path, overrides={"seed": 3})
    with pytest.raises(ValueError, match="baseline='silu'"):
        tiny_grid(tmp_path, baseline="silu")
    assert tiny_grid(tmp_path, baseline="relu;att-linear").baseline.af_type == "relu;att-linear"
    assert not (tmp_path / "compare.json").exists()


def test_the_compare_command_line_builds_the_grid(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="afgpt")
    compare.build_compare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--af", "gelu;att-linear,silu;att-linear", "--seeds", "0,1",
                              "--output-dir", str(tmp_path), "--max-steps", "4", "--plan",
                              *[x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]])
    args.run(args)
    assert len(capsys.readouterr().out.splitlines()) == 4
    assert CompareGrid.load(tmp_path).shared == {"model": "afgpt", "max_steps": 4, **TINY}
    assert parse_overrides(["kan_grid_range=[-2, 2]", "doc-masking=false", "data=x.txt"]) == {
        "kan_grid_range": [-2, 2], "doc_masking": False, "data": "x.txt"}
