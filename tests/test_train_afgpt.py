"""train_afgpt.py: lm-afs flags mapped onto afgpt training, plus lm-afs's activation CSV."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from afgpt.data import write_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_afgpt  # noqa: E402

N_LAYERS = 2
TINY = ["--dimEmb", "32", "--nLayers", str(N_LAYERS), "--nHeads", "2", "--seqLength", "64", "--contextSize", "64",
        "--nSteps", "6", "--nStepsWarmup", "1", "--nStepsCooldown", "2", "--valEvery", "3", "--nTokensVa", "256",
        "--batchSize", "2"]


@pytest.fixture(autouse=True)
def fast_runs(monkeypatch):
    """Tiny runs: one thread (no contention on shared CPUs) and no plots (tested elsewhere)."""
    monkeypatch.setattr("afgpt.training.save_plots", lambda *args, **kwargs: None)
    monkeypatch.setattr("afgpt.training.plot_activations", lambda *args, **kwargs: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    """Random-token train/val shards with a few document separators, and the lm-afs data flags."""
    rng = np.random.default_rng(0)
    for name, size in (("train", 20_000), ("val", 2_000)):
        tokens = rng.integers(0, 50_000, size)
        tokens[::500] = 50256
        write_shard(tmp_path / f"tok_{name}_000000.bin", tokens)
    return ["--filesTokensTr", str(tmp_path / "tok_train_*.bin"), "--filesTokensVa", str(tmp_path / "tok_val_*.bin"),
            "--dirResults", str(tmp_path / "results")]


def run(shards: list[str], run_name: str, *extra: str) -> Path:
    train_afgpt.main([*TINY, *shards, "--runName", run_name, *extra])
    return Path(shards[shards.index("--dirResults") + 1])


def csv_lines(results: Path, run_name: str) -> list[list[float]]:
    text = (results / f"ptAf-{run_name}-step0006.csv").read_text()
    return [[float(v) for v in line.split(",")] for line in text.splitlines()]


def test_spline_run_writes_log_and_csv(shards):
    results = run(shards, "both", "--afType", "spline;att-spline")
    assert "Step 6/6   lossVa" in (results / "log-both.txt").read_text()
    assert (results / "both" / "config.json").exists()
    lines = csv_lines(results, "both")
    assert len(lines) == 2 * 2 * N_LAYERS
    for anchors in lines[::2]:
        assert len(anchors) == 64 and anchors[0] == -15 and anchors[-1] == 15


def test_mlp_only_spline_means_att_linear(shards, capsys):
    results = run(shards, "mlp", "--afType", "spline")
    assert "spline;att-linear" in capsys.readouterr().out
    assert len(csv_lines(results, "mlp")) == 2 * N_LAYERS


def test_fixed_activations_write_no_csv(shards):
    results = run(shards, "gelu", "--afType", "gelu;att-linear")
    assert (results / "log-gelu.txt").exists()
    assert not list(results.glob("ptAf-*.csv"))


@pytest.mark.parametrize("flag, value", [
    ("nModels", "2"), ("afFileToLoad", "af.csv"), ("sameDataAcrossModels", "1"), ("sameInitAcrossModels", "true"),
    ("freezeEmbeddings", "1"), ("shuffleTrData", "2"), ("tieEmbeddings", "0")])
def test_unsupported_flags_fail_clearly(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_afgpt.main([f"--{flag}", value])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert f"--{flag}" in err and "not yet supported" in err


def test_unknown_flag_is_an_argparse_error():
    with pytest.raises(SystemExit) as exit_info:
        train_afgpt.main(["--noSuchFlag", "1"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("text, value", [("1", True), ("0", False), ("true", True), ("False", False)])
def test_booleans_parse(text, value):
    args = train_afgpt.build_parser().parse_args(["--tieEmbeddings", text])
    assert args.tieEmbeddings is value


def test_non_learnable_types_freeze_both_parts():
    flags = train_afgpt.normalize(train_afgpt.LmAfsFlags(runName="x", afType="gelu;att-linear"))
    assert flags.afLr == 0 and flags.afLayerSpecific == 0
    flags = train_afgpt.normalize(train_afgpt.LmAfsFlags(runName="x", afType="gelu;att-spline"))
    assert flags.afLr == 0.1 and flags.afLayerSpecific == 1


def test_config_mapping():
    flags = train_afgpt.LmAfsFlags(runName="r", dirResults="res", valEvery=0, lrSchedule="cosine",
                                   dtype="bfloat16", tokenDocSep=-1)
    cfg = train_afgpt.to_train_config(flags)
    assert cfg.output_dir == str(Path("res") / "r") and cfg.log_file == str(Path("res") / "log-r.txt")
    assert cfg.eval_steps == 20000 and cfg.lr_scheduler_type == "cos" and cfg.mixed_precision == "bf16"
    assert cfg.context_size == 1024 and cfg.gradient_accumulation_steps == 1 and not cfg.doc_masking
    assert cfg.eval_batches == 10485760 // 4096 and cfg.save_steps == 20000
    with pytest.raises(ValueError, match="dtype"):
        train_afgpt.to_train_config(train_afgpt.LmAfsFlags(dtype="float16"))
