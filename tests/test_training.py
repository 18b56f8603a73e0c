import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

import afgpt
from afgpt import training
from afgpt.cli import main
from afgpt.data import write_shard
from afgpt.ensemble import Replica
from afgpt.training import AfTrainer, ActivationPlotCallback, TrainConfig, lr_factor, train
from conftest import RandomTokens, tiny_config, tiny_run


@pytest.mark.parametrize("schedule", ["trap", "warmup", "cos"])
def test_lr_schedules_follow_lm_afs(schedule):
    n, w, c = 100, 10, 40
    factors = [lr_factor(s, schedule, n, w, c) for s in range(n)]
    assert factors[:w] == pytest.approx([(s + 1) / w for s in range(w)])
    if schedule == "trap":
        assert factors[w:n - c] == pytest.approx([1.0] * (n - c - w))
        assert factors[n - c:] == pytest.approx([(n - s) / c for s in range(n - c, n)])
    elif schedule == "warmup":
        assert factors[w:] == pytest.approx([1.0] * (n - w))
    else:
        m = 5e-4
        assert factors[w:] == pytest.approx([m + (1 - m) / 2 * (1 + math.cos(math.pi * (s - w) / (n - w)))
                                             for s in range(w, n)])


@pytest.mark.parametrize("af_lr, kind", [(0.1, torch.optim.Adam), (-0.5, torch.optim.SGD), (0.0, None)])
def test_activation_parameters_get_their_own_optimizer(af_lr, kind):
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-spline"))
    cfg = TrainConfig(af_lr=af_lr)
    activations = training.activation_optimizer(model.model.activations, cfg)
    weights = training.weight_optimizer(model, cfg)
    assert weights.defaults["betas"] == (0.8, 0.95) and weights.defaults["lr"] == cfg.learning_rate
    activation_ids = {id(p) for p in model.model.activations.parameters()}
    assert not activation_ids & {id(p) for g in weights.param_groups for p in g["params"]}
    assert id(model.model.layers[0].attn.pre_activation.weight) in {id(p) for p in weights.param_groups[0]["params"]}
    if kind is None:
        assert activations is None
        assert not any(p.requires_grad for p in model.model.activations.parameters())
    else:
        assert isinstance(activations, kind) and activations.defaults["lr"] == abs(af_lr)
        assert {id(p) for p in activations.param_groups[0]["params"]} == activation_ids
        if kind is torch.optim.Adam:
            assert activations.defaults["betas"] == (0.99, 0.999)


def test_training_run_produces_a_complete_run_directory(tmp_path, shared_data):
    cfg = tiny_run(tmp_path, shared_data, af_type="spline;att-spline")
    final = train(cfg)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert train_losses[-1] < train_losses[0] - 0.5  # it learns
    assert [r["step"] for r in records if r["kind"] == "val"] == [10, 20, 30]
    assert {(r["layer"], r["slot"]) for r in records if r["kind"] == "act"} == {(0, "mlp"), (0, "att"), (1, "mlp"), (1, "att")}
    assert final["val_loss"] == pytest.approx([r["loss"] for r in records if r["kind"] == "val"][-1])
    for name in ("train_config.json", "train.log", "tokenizer.json", "config.json", "model.safetensors"):
        assert (run / name).is_file(), name
    bank_config = json.loads((run / "activations" / "af_config.json").read_text())
    assert bank_config["format"] == "afgpt-activations" and bank_config["provenance"]["steps"] == 30
    assert bank_config["provenance"]["final_val_loss"] == pytest.approx(final["val_loss"])
    from safetensors.torch import load_file
    saved = load_file(run / "activations" / "activations.safetensors")
    assert sorted(saved) == ["att.0.values", "att.1.values", "mlp.0.values", "mlp.1.values"]
    assert (run / "activations" / "activations.png").is_file()
    for plot in ("training_curves.png", "activations.png", "activation_magnitudes.png"):
        assert (run / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (run / "train.log").read_text()
    assert "1 process(es)" in log and "Step 30/30   lossVa" in log
    model = AutoModelForCausalLM.from_pretrained(run)
    assert model.config.af_type == "spline;att-spline"
    assert not torch.all(model.model.activations.mlp[0].values == 0.01)  # activations were learned
    assert torch.equal(saved["mlp.0.values"], model.model.activations.mlp[0].values.detach())
    assert TrainConfig.load(run / "train_config.json") == cfg


def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, shared_data, monkeypatch):
    reference = train(tiny_run(tmp_path / "a", shared_data, af_type="spline;att-linear", max_steps=20,
                               save_steps=5, eval_steps=20))
    real_step, calls = training.train_step, {"n": 0}

    def crash_at_step_13(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    cfg = tiny_run(tmp_path / "b", shared_data, af_type="spline;att-linear", max_steps=20, save_steps=5, eval_steps=20)
    monkeypatch.setattr(training, "train_step", crash_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(training, "train_step", real_step)
    resumed = train(cfg, resume=True)
    assert resumed["train_loss"] == reference["train_loss"]
    assert resumed["val_loss"] == reference["val_loss"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [5, 10, 15, 20]  # no duplicated records from the killed part


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, shared_data, monkeypatch):
    cfg = tiny_run(tmp_path, shared_data, max_steps=20, save_steps=5, eval_steps=20)
    real_build = training.build_model

    def poisoned(*args):
        model = real_build(*args)
        calls = {"n": 0}

        def hook(module, args, output):
            calls["n"] += 1
            if calls["n"] == 8:
                output.last_hidden_state = output.last_hidden_state * float("nan")
            return output

        model.model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(training, "build_model", poisoned)
    with pytest.raises(training.TrainingDiverged, match="loss is nan at step 8") as error:
        train(cfg)
    assert "checkpoint" in str(error.value)
    state = torch.load(tmp_path / "run" / "checkpoint" / "pytorch_model.bin", weights_only=True) \
        if (tmp_path / "run" / "checkpoint" / "pytorch_model.bin").exists() else None
    checkpoint_files = os.listdir(tmp_path / "run" / "checkpoint")
    assert checkpoint_files, "the step-5 checkpoint must survive"
    if state is not None:
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_existing_output_directory_is_refused_unless_asked(tmp_path, shared_data):
    cfg = tiny_run(tmp_path, shared_data, max_steps=5, warmup_steps=1, cooldown_steps=1, eval_steps=5)
    train(cfg)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        train(cfg)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    train(cfg, overwrite=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint|does not exist"):
        train(tiny_run(tmp_path / "other", shared_data), resume=True)


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("make_args, message", [
    (lambda tmp: ["--data", str(tmp / "missing.txt")], "does not exist"),
    (lambda tmp: ["--data", str(tmp / "empty")], "no .txt/.jsonl/.json"),
    (lambda tmp: ["--data", str(tmp / "blank.txt")], "no non-empty documents"),
    (lambda tmp: ["--data", str(tmp / "short.txt"), "--val-tokens", "8", "--seq-length", "64"],
     "fewer than seq_len+1"),
    (lambda tmp: ["--af-type", "gelu"], "af_type='gelu' is malformed"),
])
def test_bad_input_gets_a_clear_error(tmp_path, capsys, make_args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("   \n")
    (tmp_path / "short.txt").write_text("a few words only. " * 3)
    code, err = run_cli(["train", "--output-dir", str(tmp_path / "run"), "--vocab-size", "300",
                         "--max-steps", "2", "--warmup-steps", "1", "--cooldown-steps", "1",
                         *make_args(tmp_path)], capsys)
    assert code != 0 and message in str(code) + err


def test_unknown_flag_is_rejected(capsys):
    code, err = run_cli(["train", "--no-such-flag", "1"], capsys)
    assert code == 2 and "--no-such-flag" in err


def test_token_ids_beyond_the_tokenizer_are_rejected(tmp_path, shared_data, capsys):
    write_shard(tmp_path / "x_train_000001.bin", np.arange(3000) + 57000)
    write_shard(tmp_path / "x_val_000000.bin", np.arange(300))
    code, err = run_cli(["train", "--output-dir", str(tmp_path / "run"), "--data", str(tmp_path / "*_train_*.bin"),
                         "--val-data", str(tmp_path / "*_val_*.bin"),
                         "--tokenizer", str(shared_data / "tokenizers" / "gpt2")], capsys)
    assert "token id 59999 >= vocab size 50304" in str(code)


def test_model_and_tokenizer_vocabularies_must_match(tmp_path, shared_data, capsys):
    afgpt.AfGPTForCausalLM(tiny_config(vocab_size=256)).save_pretrained(tmp_path / "small")
    code, err = run_cli(["train", "--output-dir", str(tmp_path / "run"), "--model-name-or-path",
                         str(tmp_path / "small"), "--vocab-size", "384", "--max-steps", "2", "--warmup-steps", "1",
                         "--cooldown-steps", "1", "--data", str(shared_data / "tiny_shakespeare" / "input.txt.gz")],
                        capsys)
    assert "vocab_size 256 but the tokenizer has 384" in str(code)


def test_af_trainer_gives_activations_their_own_lr_and_betas_and_plots_them(tmp_path):
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-spline"))
    before = model.model.activations.mlp[0].values.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             lr_scheduler_type="constant")
    trainer = AfTrainer(model=model, args=args, train_dataset=RandomTokens(), af_lr=0.05, af_betas=(0.9, 0.99),
                        callbacks=[ActivationPlotCallback()])
    trainer.train()
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 0.05]
    assert groups[1]["betas"] == (0.9, 0.99) and groups[0]["betas"] == (0.9, 0.999)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.model.activations.parameters()}
    assert not torch.equal(model.model.activations.mlp[0].values, before)
    assert (tmp_path / "plots" / "activations-step3.png").is_file()


def test_af_trainer_freezes_activations_with_zero_lr(tmp_path):
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-spline"))
    before = model.model.activations.mlp[0].values.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    AfTrainer(model=model, args=args, train_dataset=RandomTokens(), af_lr=0.0).train()
    assert torch.equal(model.model.activations.mlp[0].values, before)


def test_two_processes_under_accelerate_launch(tmp_path, shared_data):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "afgpt.cli", "train",
           "--output-dir", str(tmp_path / "run"), "--data", str(shared_data / "tiny_shakespeare" / "input.txt.gz"),
           "--vocab-size", "384", "--hidden-size", "32", "--num-hidden-layers", "2", "--max-steps", "6",
           "--warmup-steps", "1", "--cooldown-steps", "2", "--seq-length", "32", "--per-device-train-batch-size", "4",
           "--eval-steps", "6", "--eval-batches", "1", "--logging-steps", "3"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "2 process(es)" in log
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_bf16_accumulation_and_clipping_run(tmp_path, shared_data, monkeypatch):
    seen = {}
    real_clip = training.Accelerator.clip_grad_norm_

    def clip(self, parameters, max_norm, *args, **kwargs):
        seen["max_norm"] = max_norm
        return real_clip(self, parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(training.Accelerator, "clip_grad_norm_", clip)
    cfg = tiny_run(tmp_path, shared_data, af_type="spline;att-spline", mixed_precision="bf16",
                   gradient_accumulation_steps=2, max_grad_norm=1.0, max_steps=6, warmup_steps=1,
                   cooldown_steps=2, eval_steps=6, logging_steps=3)
    final = train(cfg)
    assert math.isfinite(final["val_loss"]) and seen["max_norm"] == 1.0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert model.model.activations.mlp[0].values.dtype == torch.float32
    warned = "mixed_precision='no'" in (tmp_path / "run" / "train.log").read_text()
    assert warned == (not training.cpu_has_native_bf16())  # this machine's CPU decides


@pytest.mark.parametrize("native, precision, device, warned", [
    (False, "bf16", "cpu", True), (True, "bf16", "cpu", False),
    (False, "no", "cpu", False), (False, "bf16", "cuda", False)])
def test_warns_when_bf16_matmuls_would_be_emulated(monkeypatch, caplog, native, precision, device, warned):
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(training.logger, "propagate", True)  # a run in this process turned it off
    with caplog.at_level(logging.WARNING, logger="afgpt"):
        training.warn_if_bf16_is_emulated(precision, torch.device(device))
    assert ("mixed_precision='no'" in caplog.text) == warned


class CaptureGrads(torch.optim.SGD):
    """An optimizer that records the gradients it is asked to apply."""

    def step(self, closure=None):
        self.seen = {id(p): p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None}


def test_gradient_accumulation_matches_one_large_batch():
    torch.manual_seed(0)
    model = afgpt.AfGPTForCausalLM(tiny_config())
    x = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(0))
    inputs, labels = x[:, :-1], x[:, 1:]
    model(input_ids=inputs, shift_labels=labels).loss.backward()
    reference = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    model.zero_grad()
    optimizer = CaptureGrads(model.parameters(), lr=0.0)
    halves = iter([(inputs[:2], labels[:2]), (inputs[2:], labels[2:])])
    training.AcceleratorState._reset_state()
    training.train_step([Replica(0, model, optimizer, halves)], None, 0, training.Accelerator(mixed_precision="no"),
                        TrainConfig(gradient_accumulation_steps=2))
    assert reference.keys() == optimizer.seen.keys()
    for key, grad in reference.items():
        torch.testing.assert_close(optimizer.seen[key], grad, atol=5e-5, rtol=1e-3)  # a missing 1/2 would be 100%


@pytest.mark.parametrize("level, plots", [(0, set()), (1, {"training_curves.png", "activations.png"}),
                                          (2, {"training_curves.png", "activations.png", "activation_magnitudes.png"})])
def test_plotting_level_sets_which_plots_a_run_draws(tmp_path, level, plots):
    train(tiny_run(tmp_path, max_steps=4, warmup_steps=1, cooldown_steps=1, eval_steps=2, save_steps=4,
                   vocab_size=300, plotting_level=level, save_af_steps=2, af_type="spline;att-linear"))
    run = tmp_path / "run"
    assert {p.name for p in (run / "plots").glob("*.png")} == plots
    assert [p.name for p in sorted((run / "activation_snapshots").iterdir())] == ["step-000002"]  # and 4: final


def test_resume_finds_a_checkpoint_left_mid_swap(tmp_path):
    # killed between save_checkpoint's two renames: the last good checkpoint sits at checkpoint.old
    out = tmp_path / "run"
    (out / "checkpoint.old").mkdir(parents=True)
    (out / "checkpoint.old" / "state").write_text("step 10")
    assert training.prepare_run_directory(TrainConfig(output_dir=str(out)), resume=True, overwrite=False) == out
    assert (out / "checkpoint" / "state").read_text() == "step 10"
    assert not (out / "checkpoint.old").exists()


def test_replace_directory_keeps_the_only_complete_copy_when_interrupted_again(tmp_path, monkeypatch):
    from afgpt import atomic
    target, old, new = tmp_path / "checkpoint", tmp_path / "checkpoint.old", tmp_path / "checkpoint.tmp"
    old.mkdir()
    (old / "state").write_text("step 10")  # left by an earlier interrupted swap
    new.mkdir()
    (new / "state").write_text("step 15")
    real_replace = os.replace

    def fail_on_new(src, dst):
        if Path(src) == new:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", fail_on_new)
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_directory(new, target, old)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    atomic.restore_interrupted(target, old)
    assert (target / "state").read_text() == "step 10"
