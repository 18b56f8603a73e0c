"""afgpt compare: a grid of tiny runs, the paired statistics, skipping, resuming, failures, plan and collect."""
import argparse
import json
import math
import shlex
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA
from safetensors.torch import load_file

from afgpt import compare
from afgpt.cli import TRAIN_FIELDS, build_parser
from afgpt.compare import (CompareGrid, build_grid, collect, paired_difference, parse_overrides, plan, run_grid,
                           run_status)
from afgpt.plotting import read_metrics
from afgpt.training import TrainConfig, TrainingDiverged, loop
from afgpt.training.families import non_embedding_parameters

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
    monkeypatch.setattr(compare.runner, "train", lambda *args, **kwargs: calls.append(args))
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
    real_train = compare.runner.train
    monkeypatch.setattr(compare.runner, "train", lambda cfg, **kw: seen.append(kw) or real_train(cfg, **kw))
    results = run_grid(grid)
    assert seen == [{"resume": True, "overwrite": False}]
    assert results["variants"][0]["seeds_done"] == [0] and run_status(run_dir, 6) == "done"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"] == [2, 4, 6]


def test_a_failing_variant_is_reported_and_the_others_complete(tmp_path, monkeypatch, one_thread):
    grid = tiny_grid(tmp_path, af_types="gelu;att-linear,relu;att-linear,prelu;att-linear", seeds="0")
    real_train = compare.runner.train

    def diverging_relu(cfg, **kwargs):
        if cfg.af_type.startswith("relu"):
            raise TrainingDiverged("loss is nan at step 3")
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(compare.runner, "train", diverging_relu)
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


def test_stage2_variants_learn_activations_once_and_compare_fresh_models_with_them_frozen(tmp_path, one_thread):
    grid = tiny_grid(tmp_path, af_types="gelu;att-linear,spline;att-spline@stage2", seeds="0,1", n_models=2,
                     staggered_starts=1)
    spline = grid.variants[1]
    assert spline.stage2 and spline.name == "spline;att-spline@stage2 mlp" and spline.af_type == "spline;att-spline"
    results = run_grid(grid)
    stage1 = grid.stage1_dir(spline)
    stage1_cfg = json.loads((stage1 / "train_config.json").read_text())
    assert stage1_cfg["n_models"] == 2 and stage1_cfg["staggered_starts"] == 1 and stage1_cfg["seed"] == 0
    assert stage1_cfg["af_lr"] > 0 and stage1_cfg["af_file"] is None
    learned = load_file(stage1 / "activations" / "activations.safetensors")
    for seed in grid.seeds:
        run_dir = grid.run_dir(spline, seed)
        cfg = json.loads((run_dir / "train_config.json").read_text())
        assert cfg["n_models"] == 1 and cfg["af_lr"] == 0 and cfg["af_file"] == str(stage1) and cfg["seed"] == seed
        final = load_file(run_dir / "activations" / "activations.safetensors")
        assert final.keys() == learned.keys()
        assert all(torch.equal(final[k], learned[k]) for k in learned)  # loaded and frozen through stage II
    assert not torch.equal(learned["mlp.0.values"], torch.full_like(learned["mlp.0.values"], 0.01))  # learned
    row = results["variants"][1]
    assert row["stage2"] and row["seeds_done"] == [0, 1] and row["vs_baseline"]["seeds"] == [0, 1]
    assert results["stage1_plots"] == {spline.name: "stage1_spline_att-spline_stage2_mlp.png"}
    assert (tmp_path / "stage1_spline_att-spline_stage2_mlp.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "results.md").read_text()
    assert "stage II: activations from a 2-replica stage I, frozen" in table
    assert "![spline;att-spline@stage2 mlp](stage1_spline_att-spline_stage2_mlp.png)" in table


def test_a_stage2_run_without_its_stage1_fails_with_the_reason_and_the_grid_goes_on(tmp_path, monkeypatch,
                                                                                    one_thread):
    grid = tiny_grid(tmp_path, af_types="gelu;att-linear,spline;att-spline@stage2", seeds="0", n_models=2)
    real_train = compare.runner.train

    def failing_stage1(cfg, **kwargs):
        if cfg.n_models > 1:
            raise RuntimeError("out of memory")
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(compare.runner, "train", failing_stage1)
    results = run_grid(grid)
    gelu, spline = results["variants"]
    assert gelu["seeds_done"] == [0] and spline["seeds_done"] == []
    assert spline["errors"][0].startswith("stage I did not finish")
    assert (grid.stage1_dir(grid.variants[1]) / "compare_error.txt").read_text() == "RuntimeError: out of memory"


def test_unknown_variant_suffixes_and_grid_managed_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown suffix '@stage3'"):
        tiny_grid(tmp_path, af_types="gelu;att-linear,spline;att-spline@stage3")
    with pytest.raises(ValueError, match="n_models: the comparison sets"):
        tiny_grid(tmp_path, overrides={"n_models": 3})


@pytest.mark.parametrize("af_types, ffn_types", [
    ("gelu;att-linear,splinePerDim;att-linear,la_per_channel;att-linear", "mlp,glu"),
    ("gelu;att-linear", "mlp,moa,moa_glu,kan")])
def test_match_params_gives_each_variant_the_width_closest_to_the_baselines_parameter_count(tmp_path, af_types,
                                                                                          ffn_types):
    grid = tiny_grid(tmp_path, af_types=af_types, ffn_types=ffn_types)
    matched = tiny_grid(tmp_path, af_types=af_types, ffn_types=ffn_types, match_params=True)
    assert [v.name for v in matched.variants] == [v.name for v in grid.variants]

    def count(variant, width="its own"):
        width = variant.intermediate_size if width == "its own" else width
        return non_embedding_parameters(matched.config(replace(variant, intermediate_size=width), 0))

    target = count(matched.baseline)
    assert matched.baseline.intermediate_size is None and matched.baseline == grid.baseline
    for before, after in zip(grid.variants[1:], matched.variants[1:]):
        error = abs(count(after) - target)
        if after.intermediate_size is None:  # no width comes closer than the default one, which is kept
            assert all(abs(count(after, width) - target) >= error for width in (4 * 32 - 1, 4 * 32 + 1))
            continue  # (the count grows with the width: the neighbours are the nearest competitors)
        assert abs(count(before) - target) > error  # closer than the default width
        for neighbour in (after.intermediate_size - 1, after.intermediate_size + 1):
            assert abs(count(after, neighbour) - target) >= error  # and the closest width there is
        assert error / target < 0.01
        assert matched.config(after, 0).intermediate_size == after.intermediate_size
    if "splinePerDim" in af_types:  # 64 spline values per hidden unit: a narrower MLP
        assert matched.variants[2].intermediate_size < 4 * 32


def test_match_params_runs_report_their_width_and_parameter_counts(tmp_path, one_thread):
    grid = tiny_grid(tmp_path, af_types="gelu;att-linear,splinePerDim;att-linear", seeds="0", match_params=True,
                     max_steps=2)
    results = run_grid(grid)
    base, spline = results["variants"]
    width = grid.variants[1].intermediate_size
    assert spline["intermediate_size"] == width < 128
    assert abs(spline["params_non_embedding"] - base["params_non_embedding"]) < 0.01 * base["params_non_embedding"]
    run_cfg = json.loads((grid.run_dir(grid.variants[1], 0) / "train_config.json").read_text())
    assert run_cfg["intermediate_size"] == width
    assert f"intermediate_size {width} (matched)" in (tmp_path / "results.md").read_text()


def test_plan_writes_stage1_commands_to_run_first(tmp_path, capsys):
    grid = tiny_grid(tmp_path, af_types="gelu;att-linear,spline;att-spline@stage2", seeds="0,1", n_models=3,
                     evaluations={"blimp": {"data": "blimp_dir", "limit": 5}})
    lines = plan(grid)
    stage1 = (tmp_path / "commands_stage1.txt").read_text().splitlines()
    later = (tmp_path / "commands.txt").read_text().splitlines()
    assert lines == stage1 + later and len(stage1) == 1 and len(later) == 4
    parser = build_parser()

    def config_of(line: str) -> TrainConfig:
        train_words = shlex.split(line.split(" && ")[0])
        args = parser.parse_args(train_words[1:])
        return TrainConfig(**{name: getattr(args, name) for name in TRAIN_FIELDS})

    assert config_of(stage1[0]) == TrainConfig(**grid.stage1_fields(grid.variants[1]))
    for line, (variant, seed) in zip(later, grid.runs()):
        assert config_of(line) == grid.config(variant, seed)
        evaluation = shlex.split(line.split(" && ")[1])
        assert evaluation == ["afgpt", "eval-blimp", str(grid.run_dir(variant, seed)), "--data", "blimp_dir",
                              "--limit", "5"]
        assert parser.parse_args(evaluation[1:]).limit == 5


def test_jobs_train_runs_side_by_side_with_the_same_results(finished, tmp_path):
    grid, results = finished
    side_by_side = tiny_grid(tmp_path)
    parallel = run_grid(side_by_side, jobs_at_once=2)
    for one, two in zip(results["variants"], parallel["variants"]):
        assert two["seeds_done"] == [0, 1]
        for seed in (0, 1):
            assert two["runs"][seed]["val_loss"] == pytest.approx(one["runs"][seed]["val_loss"], abs=1e-5)


@pytest.mark.skipif(not (SHARED_DATA / "blimp").is_dir() or not (SHARED_DATA / "superglue").is_dir(),
                    reason=f"staged BLiMP and SuperGLUE data not found under {SHARED_DATA}")
def test_evaluations_add_columns_run_once_and_a_failed_one_is_retried(tmp_path, monkeypatch, one_thread):
    evaluations = {"blimp": {"data": str(SHARED_DATA / "blimp"), "limit": 3},
                   "superglue": {"data": str(tmp_path / "missing"), "tasks": ["cb"], "preset": "quick"}}
    grid = tiny_grid(tmp_path / "grid", af_types="gelu;att-linear", seeds="0,1", max_steps=2,
                     evaluations=evaluations, overrides={"seq_length": 128})  # BLiMP and SuperGLUE fit
    results = run_grid(grid)
    row = results["variants"][0]
    run_dir = grid.run_dir(grid.variants[0], 0)
    blimp = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "blimp"]
    assert len(blimp) == 1 and blimp[0]["settings"]["limit"] == 3
    assert row["blimp_mean"] == pytest.approx(statistics.fmean(
        [r["overall"] for s in (0, 1) for r in read_metrics(grid.run_dir(grid.variants[0], s) / "metrics.jsonl")
         if r["kind"] == "blimp"]))
    assert row["superglue_mean"] is None and "superglue: FileNotFoundError" in row["eval_errors"][0]
    table = (tmp_path / "grid" / "results.md").read_text()
    assert "BLiMP (mean ± std)" in table and "SuperGLUE (mean ± std)" in table and "evaluation failed" in table

    grid.evaluations["superglue"]["data"] = str(SHARED_DATA)  # the data is found: the rerun evaluates only that
    monkeypatch.setattr(compare.runner, "train", lambda *a, **k: pytest.fail("finished runs must not retrain"))
    results = run_grid(grid)
    row = results["variants"][0]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["kind"] for r in records].count("blimp") == 1  # not scored twice
    cb = [r for r in records if r["kind"] == "superglue"]
    assert len(cb) == 1 and cb[0]["task"] == "cb"
    assert row["eval_errors"] == {} and row["superglue_mean"] == pytest.approx(statistics.fmean(
        [statistics.fmean(r["metrics"].values()) for s in (0, 1) for r in read_metrics(
            grid.run_dir(grid.variants[0], s) / "metrics.jsonl") if r["kind"] == "superglue"]))


def test_the_compare_command_line_passes_stage1_matching_and_evaluation_settings(tmp_path, capsys):
    parser = build_parser()
    args = parser.parse_args(["compare", "--af", "gelu;att-linear,splinePerDim;att-linear@stage2", "--seeds", "0",
                              "--output-dir", str(tmp_path), "--max-steps", "4", "--n-models", "3",
                              "--staggered-starts", "1", "--match-params", "--blimp", "b", "--blimp-limit", "4",
                              "--superglue", "s", "--superglue-tasks", "cb,rte", "--superglue-preset", "quick",
                              "--plan", *[x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]])
    args.run(args)
    grid = CompareGrid.load(tmp_path)
    assert grid.stage1 == {"n_models": 3, "staggered_starts": 1}
    assert grid.variants[1].stage2 and grid.variants[1].intermediate_size < 128
    assert grid.evaluations == {"blimp": {"data": "b", "limit": 4},
                                "superglue": {"data": "s", "tasks": ["cb", "rte"], "preset": "quick"}}
    assert len(capsys.readouterr().out.splitlines()) == 3  # stage I, then two runs
    for bad, message in ((["--jobs", "0"], "--jobs 0"), ([], "--af is required")):
        args = parser.parse_args(["compare", "--output-dir", str(tmp_path / "x"), *bad,
                                  *(["--af", "gelu;att-linear"] if bad else [])])
        with pytest.raises(ValueError, match=message):
            args.run(args)
    with pytest.raises(FileNotFoundError, match="compare.json does not exist"):
        collect(tmp_path / "x")
