"""train_afgpt.py: lm-afs flags mapped onto afgpt training, plus lm-afs's activation CSV."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from afgpt.activations import LEARNABLE_NAMES
from afgpt.bank import read_activations
from afgpt.data import write_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_afgpt  # noqa: E402

N_LAYERS = 2
TINY = ["--dimEmb", "32", "--nLayers", str(N_LAYERS), "--nHeads", "2", "--seqLength", "64", "--contextSize", "64",
        "--nSteps", "6", "--nStepsWarmup", "1", "--nStepsCooldown", "2", "--valEvery", "3", "--nTokensVa", "256",
        "--batchSize", "2"]


@pytest.fixture(autouse=True)
def fast_runs(monkeypatch, one_thread):
    """Tiny runs: one thread (conftest's one_thread) and no plots (tested elsewhere)."""
    monkeypatch.setattr("afgpt.training.loop.save_plots", lambda *args, **kwargs: None)
    monkeypatch.setattr("afgpt.bank.plot_activations", lambda *args, **kwargs: None)


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


@pytest.mark.parametrize("flag, value", [("freezeEmbeddings", "1"), ("shuffleTrData", "2"), ("tieEmbeddings", "0")])
def test_unsupported_flags_fail_clearly(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_afgpt.main([f"--{flag}", value])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert f"--{flag}" in err and "not yet supported" in err


README_STAGE_ONE = ["--seed", "1234", "--nModels", "20", "--staggeredStarts", "1", "--afLayerSpecific", "0",
                    "--afType", "spline;att-spline", "--afLr", "0.1", "--runName", "optimizedMlpAtt-layerShared-phase1"]
README_STAGE_TWO = ["--seed", "0", "--afLayerSpecific", "0", "--afType", "spline;att-spline", "--afLr", "0",
                    "--runName", "optimizedMlpAtt-layerShared-phase2", "--afFileToLoad"]


def test_lm_afs_readme_stage_one_then_stage_two(shards, capsys):
    """lm-afs's README commands, unchanged but for tiny sizes: 20 replicas learn shared splines, then a fresh
    model loads them from the .pt file, frozen."""
    results = Path(shards[shards.index("--dirResults") + 1])
    train_afgpt.main([*TINY, *shards, *README_STAGE_ONE])
    stage_one = results / "ptAf-optimizedMlpAtt-layerShared-phase1-step0006.pt"
    assert stage_one.is_file() and stage_one.with_suffix(".csv").is_file()
    log = (results / "log-optimizedMlpAtt-layerShared-phase1.txt").read_text()
    assert "20 replicas sharing their activations" in log
    assert "replicas 19/20 active" in log  # in 6 steps the last replica (start round(5.7) = 6) never runs
    learned = read_activations(stage_one)
    assert learned.settings.af_layer_specific == 0 and not torch.all(learned.state_dict()["mlp.0.values"] == 0.01)

    train_afgpt.main([*TINY, *shards, *README_STAGE_TWO, str(stage_one)])
    final = read_activations(results / "optimizedMlpAtt-layerShared-phase2" / "activations")
    for name, values in learned.state_dict().items():
        assert torch.equal(final.state_dict()[name], values), name  # frozen: bit-identical after training
    assert "frozen" in (results / "log-optimizedMlpAtt-layerShared-phase2.txt").read_text()
    assert not list(results.glob("ptAf-optimizedMlpAtt-layerShared-phase2-*"))  # lm-afs: afLr 0 saves no AF


def test_lm_afs_readme_mlp_only_stage_two_accepts_plain_spline(shards, capsys):
    results = run(shards, "mlp1", "--afType", "spline;att-linear", "--nModels", "2", "--staggeredStarts", "2")
    stage_one = results / "ptAf-mlp1-step0006.pt"
    run(shards, "mlp2", "--afType", "spline", "--afLr", "0", "--afFileToLoad", str(stage_one))
    assert "spline;att-linear" in capsys.readouterr().out
    final = read_activations(results / "mlp2" / "activations")
    assert torch.equal(final.state_dict()["mlp.1.values"], read_activations(stage_one).state_dict()["mlp.1.values"])


def test_save_af_every_writes_intermediate_files(shards):
    results = run(shards, "snap", "--afType", "spline;att-linear", "--saveAfEvery", "2")
    steps = sorted(p.name for p in results.glob("ptAf-snap-step*.csv"))
    assert steps == ["ptAf-snap-step0002.csv", "ptAf-snap-step0004.csv", "ptAf-snap-step0006.csv"]
    assert csv_lines(results, "snap") != [[float(v) for v in line.split(",")] for line in
                                          (results / "ptAf-snap-step0002.csv").read_text().splitlines()]


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


@pytest.mark.parametrize("kind", LEARNABLE_NAMES)
@pytest.mark.parametrize("slot", ["mlp", "att"])
def test_every_learnable_kind_keeps_its_learning_rate_and_layer_sharing(kind, slot):
    af_type = f"{kind};att-linear" if slot == "mlp" else f"gelu;att-{kind}"
    flags = train_afgpt.normalize(train_afgpt.LmAfsFlags(runName="x", afType=af_type, afLr=0.05, afLayerSpecific=1))
    cfg = train_afgpt.to_train_config(flags)
    assert (cfg.af_lr, cfg.af_layer_specific, cfg.af_type) == (0.05, 1, af_type)


def test_a_prelu_run_learns_its_slopes(shards, capsys):
    results = run(shards, "prelu", "--afType", "prelu;att-linear")
    model = AutoModelForCausalLM.from_pretrained(results / "prelu")
    slopes = [m.slope.detach() for m in model.model.activations.mlp]
    assert len(slopes) == N_LAYERS and not any(torch.all(s == 0.25) for s in slopes)  # learned, one per layer
    assert not list(results.glob("ptAf-prelu-*"))  # lm-afs's files hold only splines
    assert "ptAf files hold only splines" in capsys.readouterr().out
    assert read_activations(results / "prelu" / "activations").state_dict()["mlp.0.slope"].shape == (4 * 32,)


@pytest.mark.parametrize("flag, value, fix", [
    ("freezeEmbeddings", "1", "drop the flag"), ("shuffleTrData", "2", "use --shuffleTrData 1"),
    ("tieEmbeddings", "0", "drop the flag"), ("tokenDocSep", "0", "use 50256 (GPT-2's <|endoftext|>) or -1")])
def test_unsupported_flags_say_what_to_use_instead(flag, value, fix, capsys):
    with pytest.raises(SystemExit):
        train_afgpt.main([f"--{flag}", value])
    err = capsys.readouterr().err
    assert f"--{flag} " in err and "not yet supported" in err and fix in err


def test_accepted_but_ignored_flags_get_one_note(capsys):
    train_afgpt.normalize(train_afgpt.LmAfsFlags(runName="x", plotMinAcc=0.1, plotMaxLoss=5.0, flexBlockSize=64))
    out = capsys.readouterr().out
    assert out.count("accepted, ignored") == 1 and "--plotMinAcc --plotMaxLoss --flexBlockSize accepted" in out
    train_afgpt.normalize(train_afgpt.LmAfsFlags(runName="x"))
    assert "ignored" not in capsys.readouterr().out
