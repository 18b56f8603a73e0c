import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import AutoModelForCausalLM, TrainingArguments

import afgpt
from afgpt import cli, training
from afgpt import data as data_lib
from afgpt.cli import main
from afgpt.data import write_shard
from afgpt.ensemble import Replica
from afgpt.activation_set import SlotActivation
from afgpt.training import loop, monitors
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
    weight_ids = {id(p) for g in weights.param_groups for p in g["params"]}
    assert not activation_ids & weight_ids
    assert id(model.model.layers[0].attn.pre_activation.weight) in weight_ids
    if kind is None:
        assert activations is None
        assert not any(p.requires_grad for p in model.model.activations.parameters())
    else:
        assert isinstance(activations, kind) and activations.defaults["lr"] == abs(af_lr)
        assert {id(p) for p in activations.param_groups[0]["params"]} == activation_ids
        if kind is torch.optim.Adam:
            assert activations.defaults["betas"] == (0.99, 0.999)


def decay_by_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


def check_decay(decay: dict[str, float], weight_decay: float) -> None:
    """Matrices decay; RMSNorm gains, biases, scalar lambdas and skip weights do not (Trainer's rule, matrices only)."""
    for name in ("model.layers.0.attn.q_proj.weight", "model.layers.1.mlp.fc.weight", "model.embed_tokens.weight"):
        assert decay[name] == weight_decay, name
    for name in ("model.layers.0.attn_norm.weight", "model.embed_norm.bias", "model.layers.0.block_lambdas",
                 "model.layers.0.attn.value_lambda", "model.skip_weights", "model.layers.0.attn.pre_activation.weight",
                 "model.layers.0.attn.pre_activation.bias"):
        assert decay[name] == 0.0, name


def test_the_loops_weight_decay_spares_norms_biases_and_scalars():
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="prelu;att-swish"))
    optimizer = training.weight_optimizer(model, TrainConfig(weight_decay=0.1))
    assert isinstance(optimizer, torch.optim.AdamW)
    decay = decay_by_name(optimizer, model)
    check_decay(decay, 0.1)
    assert not any(name.startswith("model.activations.") for name in decay)  # they have their own optimizer


def test_training_run_produces_a_complete_run_directory(tmp_path, shared_data):
    cfg = tiny_run(tmp_path, shared_data, af_type="spline;att-spline")
    before = training.logger.level, training.logger.propagate, training.logger.handlers[:]
    final = train(cfg)
    after = training.logger.level, training.logger.propagate, training.logger.handlers
    assert after == before  # the run gives the logger back: pytest's caplog and the user's handlers still see it
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
    monkeypatch.setattr(loop, "train_step", crash_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = train(cfg, resume=True)
    assert resumed["train_loss"] == reference["train_loss"]
    assert resumed["val_loss"] == reference["val_loss"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [5, 10, 15, 20]  # no duplicated records from the killed part


def test_train_trains_and_saves_the_models_a_factory_makes(tmp_path, shared_data):
    """train(model_factory=...) trains what the factory builds (seeded with seed + m), not the AfGPT of cfg's fields."""
    built, seeds, initial = {}, {}, {}

    def factory(m: int) -> afgpt.AfGPTForCausalLM:
        seeds[m] = torch.initial_seed()
        built[m] = afgpt.AfGPTForCausalLM(tiny_config(vocab_size=384, hidden_size=48, num_hidden_layers=3,
                                                       max_position_embeddings=32, af_type="spline;att-linear"))
        initial[m] = {k: v.clone() for k, v in built[m].state_dict().items()}
        return built[m]

    cfg = tiny_run(tmp_path, shared_data, af_type="spline;att-linear", n_models=2, staggered_starts=0, seed=3,
                   max_steps=6, warmup_steps=1, cooldown_steps=2, logging_steps=3, eval_steps=6, save_steps=6)
    final = train(cfg, model_factory=factory)
    assert seeds == {0: 3, 1: 4} and math.isfinite(final["val_loss"])
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert (saved.config.hidden_size, saved.config.num_hidden_layers) == (48, 3) != (cfg.hidden_size,
                                                                                     cfg.num_hidden_layers)
    trained = built[0].state_dict()
    assert saved.state_dict().keys() == trained.keys()
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0)
    assert not torch.equal(trained["model.layers.0.mlp.fc.weight"], initial[0]["model.layers.0.mlp.fc.weight"])
    assert not torch.equal(built[1].state_dict()["model.layers.0.mlp.fc.weight"],
                           initial[1]["model.layers.0.mlp.fc.weight"])  # replica 1 trained too


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

    monkeypatch.setattr(loop, "build_model", poisoned)
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
    *weights, activations = trainer.optimizer.param_groups
    assert [g["lr"] for g in weights] == [1e-3, 1e-3] and activations["lr"] == 0.05
    assert activations["betas"] == (0.9, 0.99) and all(g["betas"] == (0.9, 0.999) for g in weights)
    assert {id(p) for p in activations["params"]} == {id(p) for p in model.model.activations.parameters()}
    assert not torch.equal(model.model.activations.mlp[0].values, before)
    assert (tmp_path / "plots" / "activations-step3.png").is_file()


@pytest.mark.parametrize("optim, kind", [("sgd", torch.optim.SGD), ("adamw_torch", torch.optim.AdamW)])
def test_af_trainer_follows_args_optim_and_trainers_decay_rule(tmp_path, optim, kind):
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="prelu;att-spline"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, optim=optim,
                             weight_decay=0.1, learning_rate=1e-3)
    trainer = AfTrainer(model=model, args=args, train_dataset=RandomTokens(), af_lr=0.05)
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is kind
    decay = decay_by_name(optimizer, model)
    check_decay(decay, 0.1)
    activations = optimizer.param_groups[-1]
    assert {id(p) for p in activations["params"]} == {id(p) for p in model.model.activations.parameters()}
    assert activations["lr"] == 0.05 and activations["weight_decay"] == 0.0
    assert ("betas" in activations) == (kind is torch.optim.AdamW)
    assert set(trainer.get_decay_parameter_names(model)) == training.decay_parameter_names(model)


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
    real_clip = loop.clip_gradients

    def clip(replicas, shared, max_norm, placement, device):
        seen["max_norm"] = max_norm
        return real_clip(replicas, shared, max_norm, placement, device)

    monkeypatch.setattr(loop, "clip_gradients", clip)
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
    monkeypatch.setattr(monitors, "cpu_has_native_bf16", lambda: native)
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
    AcceleratorState._reset_state()
    training.train_step([Replica(0, model, optimizer, halves)], None, 0, Accelerator(mixed_precision="no"),
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


# ----------------------------------------------------------------------------- issue 11: settings, resume, data

TINY = dict(vocab_size=300, val_tokens=4096, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_steps=4, per_device_train_batch_size=4, seq_length=32, logging_steps=2, eval_steps=4,
            eval_batches=2, save_steps=4, plotting_level=0)


def cli_flags(**fields) -> list[str]:
    return [item for name, value in fields.items() for item in (f"--{name.replace('_', '-')}", str(value))]


def test_resuming_a_finished_run_says_so_and_returns_its_final_metrics(tmp_path):
    out = str(tmp_path / "run")
    final = train(TrainConfig(output_dir=out, **TINY))
    main(["train", "--output-dir", out, *cli_flags(**TINY), "--resume"])  # returns: exit status 0
    assert "already finished at step 4 (max_steps 4); nothing to do" in (tmp_path / "run" / "train.log").read_text()
    assert train(TrainConfig(output_dir=out, **TINY), resume=True) == final
    assert final["step"] == 4 and final["val_loss"] is not None


def test_resume_refuses_changed_settings_naming_each_and_may_train_longer(tmp_path):
    out = str(tmp_path / "run")
    train(TrainConfig(output_dir=out, **TINY))  # warmup and cooldown unset: 4 // 10 = 0 and 4 // 2 = 2
    with pytest.raises(ValueError) as error:
        train(TrainConfig(output_dir=out, **{**TINY, "learning_rate": 1e-3, "hidden_size": 64}), resume=True)
    message = str(error.value)
    assert "learning_rate: 0.003 -> 0.001" in message and "hidden_size: 32 -> 64" in message
    assert "max_steps" in message and "another --output-dir" in message
    main(["train", "--output-dir", out, *cli_flags(**{**TINY, "max_steps": 6, "eval_steps": 3}), "--resume"])
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (saved["max_steps"], saved["eval_steps"]) == (6, 3)  # what ran
    assert (saved["warmup_steps"], saved["cooldown_steps"]) == (0, 2)  # unset on resume: the run's own values
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in records if r["kind"] == "val"] == [4, 6]
    step6 = next(r for r in records if r["kind"] == "train" and r["step"] == 6)
    assert step6["lr"] == pytest.approx(3e-3 * lr_factor(5, "trap", 6, 0, 2))  # the schedule of the new max_steps


def test_tokens_per_second_and_elapsed_time_count_training_alone(tmp_path, monkeypatch):
    """A fake clock: a training step takes 1 s, a validation or checkpoint 100 s. Every window then trains
    at exactly one step's tokens per second, although eval_steps and save_steps are not multiples of logging_steps."""
    clock = {"now": 0.0}
    monkeypatch.setattr(monitors, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))

    def taking(seconds, real):
        def run(*args, **kwargs):
            clock["now"] += seconds
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(loop, "train_step", taking(1.0, training.train_step))
    monkeypatch.setattr(loop, "validate", taking(100.0, training.validate))
    monkeypatch.setattr(loop, "save_checkpoint", taking(100.0, training.save_checkpoint))
    train(TrainConfig(output_dir=str(tmp_path / "run"), **{**TINY, "max_steps": 12, "logging_steps": 4,
                                                           "eval_steps": 3, "save_steps": 5}))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    speeds = {r["step"]: r["tokens_per_second"] for r in records if r["kind"] == "train"}
    assert speeds == {4: 4 * 32, 8: 4 * 32, 12: 4 * 32}
    assert "Step 12/12   lossTr" in (log := (tmp_path / "run" / "train.log").read_text())
    assert "12s = 1.000s/step" in log


def test_the_magnitude_plot_draws_the_models_spline_range(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(monitors, "plot_training_curves", lambda *args, **kwargs: None)
    monkeypatch.setattr(monitors, "plot_activations", lambda *args, **kwargs: None)
    monkeypatch.setattr(monitors, "plot_activation_magnitudes",
                        lambda records, path, af_range=None: seen.update(af_range=af_range))
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-spline", af_range=4.0))  # a stage II bank's grid
    history = [{"kind": "act", "step": 1, "layer": 0, "slot": "mlp", "mean_abs": 1.0, "max_abs": 2.0}]
    training.save_plots(model, history, tmp_path / "plots", TrainConfig(af_range=15.0))
    assert seen["af_range"] == 4.0


@pytest.fixture(scope="module")
def small_tokenizer():
    docs = [f"Document {i}: the quick brown fox jumps over the lazy dog, again and again." for i in range(200)]
    return data_lib.train_tokenizer(docs, vocab_size=300)


def shard_config(folder: Path, **fields) -> TrainConfig:
    return TrainConfig(data=str(folder / "*_train_*.bin"), val_data=str(folder / "*_val_*.bin"), **fields)


def test_shards_from_afgpt_prepare_keep_their_separator_and_vocabulary(tmp_path, small_tokenizer):
    data_lib.prepare(["some text. " * 200] * 5, small_tokenizer, tmp_path / "tokens", val_tokens=200)
    run_data = training.load_data(shard_config(tmp_path / "tokens"), tmp_path, True, lambda: None)
    assert run_data.doc_separator == small_tokenizer.eos_token_id != 50256
    assert run_data.vocab_size == training.padded_vocab(len(small_tokenizer)) != 50304
    assert run_data.tokenizer.get_vocab() == small_tokenizer.get_vocab()


def test_a_tokenizer_that_did_not_make_the_shards_is_refused(tmp_path, small_tokenizer, shared_data):
    data_lib.prepare(["some text. " * 200] * 5, small_tokenizer, tmp_path / "tokens", val_tokens=200)
    cfg = shard_config(tmp_path / "tokens", tokenizer=str(shared_data / "tokenizers" / "gpt2"))
    with pytest.raises(ValueError) as error:
        training.load_data(cfg, tmp_path, True, lambda: None)
    message = str(error.value)
    assert "(eos id 50256, 50257 tokens) is not the tokenizer that made the shards" in message
    assert f"(eos id {small_tokenizer.eos_token_id}, {len(small_tokenizer)} tokens" in message
    assert "drop --tokenizer" in message


@pytest.fixture
def afgpt_log(monkeypatch) -> list[str]:
    """The messages the afgpt logger emits at INFO and above during the test."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    monkeypatch.setattr(training.logger, "handlers", [handler])
    monkeypatch.setattr(training.logger, "level", logging.INFO)
    return messages


def test_shards_without_a_record_are_gpt2_tokens_said_once(tmp_path, afgpt_log, small_tokenizer):
    write_shard(tmp_path / "x_train_000001.bin", np.arange(3000) % 50257)
    write_shard(tmp_path / "x_val_000000.bin", np.arange(300))
    run_data = training.load_data(shard_config(tmp_path), tmp_path, True, lambda: None)
    assert (run_data.vocab_size, run_data.doc_separator, run_data.tokenizer) == (50304, 50256, None)
    assert sum("taking them to be GPT-2 tokens" in message for message in afgpt_log) == 1
    data_lib.prepare(["some text. " * 200] * 5, small_tokenizer, tmp_path / "prepared", val_tokens=200)
    mixed = TrainConfig(data=str(tmp_path / "prepared" / "*_train_*.bin"), val_data=str(tmp_path / "x_val_*.bin"))
    with pytest.raises(ValueError, match="different tokenizers.*no record.*one `afgpt prepare` run"):
        training.load_data(mixed, tmp_path, True, lambda: None)


@pytest.mark.parametrize("max_steps, warmup, cooldown", [(200, 20, 100), (10, 1, 5), (1, 0, 0)])
def test_unset_warmup_and_cooldown_scale_with_max_steps(max_steps, warmup, cooldown):
    cfg = TrainConfig(max_steps=max_steps)
    assert (cfg.warmup_steps, cfg.cooldown_steps) == (warmup, cooldown)
    assert json.loads(json.dumps(dataclasses.asdict(cfg)))["warmup_steps"] == warmup  # train_config.json


def test_a_ten_step_smoke_run_is_a_valid_command(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "train", lambda cfg, **kwargs: seen.update(cfg=cfg))
    main(["train", "--max-steps", "10"])
    assert (seen["cfg"].warmup_steps, seen["cfg"].cooldown_steps) == (1, 5)


@pytest.mark.parametrize("fields, message", [
    (dict(max_steps=0), "max_steps=0 must be at least 1"),
    (dict(max_steps=0, warmup_steps=5), "max_steps=0 must be at least 1"),  # checked first
    (dict(max_steps=10, warmup_steps=5, cooldown_steps=6),
     r"warmup_steps \(5\) \+ cooldown_steps \(6\) exceed max_steps \(10\): lower them, leave them unset "
     r"\(10% and 50% of max_steps\), or raise max_steps"),
    (dict(max_steps=10, warmup_steps=11, lr_scheduler_type="cos"),
     r"warmup_steps \(11\) exceeds max_steps \(10\): lower it, leave it unset"),
    (dict(warmup_steps=-1), "must be >= 0"),
])
def test_schedule_settings_are_checked_with_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


@pytest.mark.parametrize("schedule", ["warmup", "cos"])
def test_schedules_without_cooldown_ignore_it(schedule):
    cfg = TrainConfig(max_steps=10, warmup_steps=5, cooldown_steps=100, lr_scheduler_type=schedule)
    assert cfg.lr_factor(9) > 0


@pytest.mark.parametrize("flags, message", [
    (["--af-type", "gleu;att-linear"], "unknown MLP activation 'gleu'"),
    (["--hidden-size", "130"], "hidden_size=130 is not divisible by num_attention_heads=4"),
    (["--hidden-size", "12"], "is odd: rotary embeddings need an even head size"),
    (["--af-layer-specific", "3"], "af_layer_specific=3 is invalid"),
    (["--af-n-anchors", "1"], "af_n_anchors=1 is invalid"),
    (["--af-range", "0"], "af_range=0.0 is invalid"),
    (["--tokenizer", "./no-such-tokenizer"], "tokenizer='./no-such-tokenizer' does not exist"),
    (["--af-file", "ptAf-run-step0100.pt"], "af_file='ptAf-run-step0100.pt' does not exist"),
    (["--data", "./no-such-dir/*_train_*.bin", "--val-data", "v.bin"], "no token shards match"),
    (["--data", "./x_train_*.bin"], "needs val_data"),
    (["--max-steps", "0"], "max_steps=0 must be at least 1"),
])
def test_settings_are_checked_before_any_work(tmp_path, capsys, monkeypatch, flags, message):
    def never(*args, **kwargs):
        raise AssertionError("a tokenizer or tokens were made before the settings were checked")

    monkeypatch.setattr(data_lib, "train_tokenizer", never)
    monkeypatch.setattr(data_lib, "prepare", never)
    code, err = run_cli(["train", "--output-dir", str(tmp_path / "run"), *flags], capsys)
    assert message in str(code)
    assert not (tmp_path / "run").exists()  # not even the run directory


def test_one_default_vocabulary_size():
    assert data_lib.DEFAULT_VOCAB_SIZE == TrainConfig.vocab_size == TrainConfig().vocab_size


# ----------------------------------------------------------------------------- activation sparsity

def sparsity_records(af_type: str) -> dict[tuple[int, str], dict]:
    """The "act" records of one validation-like pass of a tiny AfGPT on random tokens."""
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type=af_type, num_hidden_layers=2)).eval()
    monitor = monitors.ActivationMagnitudes(model)
    with torch.no_grad():
        model(torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0)))
    monitor.close()
    return {(r["layer"], r["slot"]): r for r in monitor.records(step=3)}


def test_relu_outputs_are_sparse_and_gelu_outputs_are_not():
    relu, gelu = sparsity_records("relu;att-linear"), sparsity_records("gelu;att-linear")
    for layer in (0, 1):
        assert relu[layer, "mlp"]["zero_frac"] > 0.3  # about half the pre-activations are negative
        assert relu[layer, "mlp"]["small_frac"] >= relu[layer, "mlp"]["zero_frac"]
        assert gelu[layer, "mlp"]["zero_frac"] < 1e-3  # GELU is exactly zero only at 0 (and far below, underflow)
        assert gelu[layer, "mlp"]["small_frac"] < 0.3
        assert relu[layer, "att"]["zero_frac"] < 1e-3  # the linear attention slot passes its input on


def test_sparsity_records_count_every_output_of_the_watched_forwards():
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="relu;att-linear", num_hidden_layers=1)).eval()
    outputs = []
    slot = next(m for m in model.modules() if isinstance(m, SlotActivation) and m.row == "mlp")
    handle = slot.register_forward_hook(lambda module, args, output: outputs.append(output.detach()))
    monitor = monitors.ActivationMagnitudes(model)
    with torch.no_grad():
        for seed in range(2):
            model(torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(seed)))
    monitor.close()
    handle.remove()
    y = torch.cat([o.flatten() for o in outputs])
    record = next(r for r in monitor.records(step=1) if r["slot"] == "mlp")
    assert record["zero_frac"] == pytest.approx((y == 0).float().mean().item())
    assert record["small_frac"] == pytest.approx((y.abs() < monitors.SMALL_OUTPUT).float().mean().item())
