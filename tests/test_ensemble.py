"""Stage I: replicas sharing one set of activations, staggered starts, per-replica logs."""
import copy
import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import afgpt
from afgpt import training
from afgpt.ensemble import Replica, build_replicas, schedule_offsets, start_steps
from afgpt.training import TrainConfig, loop, train
from conftest import tiny_config, tiny_run


def test_start_steps_follow_lm_afs_linspace():
    assert start_steps(4, 100, 1) == [0, 25, 50, 75]
    assert start_steps(3, 10, 2) == [0, 3, 7]  # round(linspace(0, 10, 4)) = 0, 3.33, 6.67 -> 0, 3, 7
    assert start_steps(3, 10, 0) == [0, 0, 0]
    assert start_steps(1, 10, 2) == [0]
    assert schedule_offsets([0, 3, 7], 2) == [0, 3, 7]
    assert schedule_offsets([0, 3, 7], 1) == [0, 0, 0]
    with pytest.raises(ValueError, match="staggered_starts=3"):
        start_steps(2, 10, 3)
    with pytest.raises(ValueError, match="n_models=0"):
        TrainConfig(n_models=0)


def test_replicas_share_the_activation_module_and_nothing_else():
    def make(m):
        torch.manual_seed(m)
        return afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-spline"))

    a, b, c = build_replicas(make, 3, same_init=False)
    assert a.model.activations is b.model.activations is c.model.activations
    assert not torch.equal(a.model.layers[0].attn.q_proj.weight, b.model.layers[0].attn.q_proj.weight)
    same = build_replicas(make, 2, same_init=True)
    assert torch.equal(same[0].model.layers[0].attn.q_proj.weight, same[1].model.layers[0].attn.q_proj.weight)
    assert same[0].model.layers[0].attn.q_proj.weight is not same[1].model.layers[0].attn.q_proj.weight
    assert same[0].model.activations is same[1].model.activations


class CaptureGrads(torch.optim.SGD):
    """Records the gradients it is asked to apply, and applies nothing."""

    def step(self, closure=None):
        self.seen = [p.grad.clone() for g in self.param_groups for p in g["params"]]


def test_bank_gradient_is_the_mean_of_the_replicas_gradients():
    def make(m):
        torch.manual_seed(m)
        return afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-spline"))

    replicas = build_replicas(make, 2, same_init=False)
    for replica in replicas:  # move every parameter off its init so all activation anchors get gradients
        for p in replica.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
    data = [torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(m)) for m in range(2)]
    separate = []
    for replica, x in zip(replicas, data):  # each replica alone, with its own copy of the activations
        alone = copy.deepcopy(replica)
        alone(input_ids=x[:, :-1], shift_labels=x[:, 1:]).loss.backward()
        separate.append([p.grad for p in alone.model.activations.parameters()])
    shared = list(replicas[0].model.activations.parameters())
    af_optimizer = CaptureGrads(shared, lr=0.0)
    runs = [Replica(m, r, torch.optim.SGD(training.split_parameters(r)[0], lr=0.0), iter([(x[:, :-1], x[:, 1:])]))
            for m, (r, x) in enumerate(zip(replicas, data))]
    AcceleratorState._reset_state()
    training.train_step(runs, af_optimizer, 0, Accelerator(mixed_precision="no"), TrainConfig())
    assert len(af_optimizer.seen) == len(shared) == 8
    for got, g0, g1 in zip(af_optimizer.seen, *separate):
        assert g0.abs().sum() > 0 and not torch.allclose(g0, g1)
        torch.testing.assert_close(got, (g0 + g1) / 2, rtol=1e-5, atol=1e-7)


def train_records(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_replica_zero_of_an_ensemble_trains_exactly_like_a_single_model(tmp_path, shared_data):
    """With fixed activations nothing is shared, so replica 0 must follow the plain run step for step."""
    common = dict(max_steps=8, logging_steps=1, eval_steps=8, save_steps=8, warmup_steps=2, cooldown_steps=3)
    plain = train(tiny_run(tmp_path / "plain", shared_data, **common))
    ensemble = train(tiny_run(tmp_path / "ens", shared_data, n_models=2, staggered_starts=2, **common))
    assert ensemble["val_loss"] == plain["val_loss"]
    ours = [r["loss"] for r in train_records(tmp_path / "ens" / "run") if r["replica"] == 0]
    assert ours == [r["loss"] for r in train_records(tmp_path / "plain" / "run")]


def test_staggered_replicas_start_late_with_their_own_schedules(tmp_path, shared_data):
    cfg = tiny_run(tmp_path, shared_data, af_type="spline;att-spline", n_models=3, staggered_starts=2, max_steps=9,
                   logging_steps=1, eval_steps=9, save_steps=9, warmup_steps=3, cooldown_steps=3)
    train(cfg)
    run = tmp_path / "run"
    records = train_records(run)
    first = {m: min(r["step"] for r in records if r["replica"] == m) for m in range(3)}
    assert first == {0: 1, 1: 4, 2: 7}  # starts 0, 3, 6: no forward or backward before them
    lr = {(r["replica"], r["step"]): r["lr"] for r in records}
    assert lr[(1, 4)] == pytest.approx(lr[(0, 1)])  # mode 2: replica 1 begins its own warmup
    assert lr[(2, 9)] == pytest.approx(cfg.learning_rate * 1.0)  # its third step: warmup done, 3/3
    log = (run / "train.log").read_text()
    assert "3 replicas sharing their activations" in log and "replicas 3/3 active" in log
    assert "lossTr per replica: " in log and "replicas 1/3 active" in log
    assert (run / "plots" / "training_curves.png").is_file()
    val = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]
    assert [(r["step"], r["replica"]) for r in val] == [(9, 0)]  # evaluation is replica 0's
    provenance = json.loads((run / "activations" / "af_config.json").read_text())["provenance"]
    assert provenance["n_models"] == 3


def test_common_schedule_mode_gives_late_replicas_the_global_learning_rate(tmp_path, shared_data):
    cfg = tiny_run(tmp_path, shared_data, n_models=2, staggered_starts=1, max_steps=8, logging_steps=1,
                   eval_steps=8, save_steps=8, warmup_steps=2, cooldown_steps=4)
    train(cfg)
    lr = {(r["replica"], r["step"]): r["lr"] for r in train_records(tmp_path / "run")}
    assert lr[(1, 6)] == pytest.approx(lr[(0, 6)])  # one schedule for all: both in its cooldown
    assert lr[(1, 6)] == pytest.approx(cfg.learning_rate * 3 / 4)  # (8 - 5) / 4 at 0-based step 5


def test_stage_one_refuses_multiple_processes():
    with pytest.raises(ValueError, match="one process"):
        fake = type("A", (), {"num_processes": 2})()
        training.build_replica_set(TrainConfig(n_models=2), None, fake)


def stage_two_replicas(tmp_path, af_lr: float):
    """A stage I bank saved to disk, and a stage II replica set built from it."""
    torch.manual_seed(0)
    learned = afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-spline", af_layer_specific=0,
                                                 num_hidden_layers=2, hidden_size=32))
    for p in learned.model.activations.parameters():
        p.data.normal_()
    afgpt.ActivationBank.from_model(learned).save(tmp_path / "bank")
    cfg = TrainConfig(af_type="spline;att-spline", af_layer_specific=0, num_hidden_layers=3, hidden_size=32,
                      num_attention_heads=2, seq_length=16, af_file=str(tmp_path / "bank"), af_lr=af_lr)
    run_data = training.RunData(np.zeros(1000, dtype=np.uint16), np.zeros(100, dtype=np.uint16), None, 97, None)
    AcceleratorState._reset_state()
    replicas, af_optimizer = training.build_replica_set(cfg, run_data, Accelerator(mixed_precision="no"))
    return learned, replicas, af_optimizer


def test_stage_two_loads_the_bank_frozen_and_out_of_every_optimizer(tmp_path):
    learned, (replica,), af_optimizer = stage_two_replicas(tmp_path, af_lr=0.0)
    shared = learned.model.activations.mlp[0].values
    for layer in range(3):  # a layer-shared bank fills a deeper model
        assert torch.equal(replica.model.model.activations.module("mlp", layer).values, shared)
    assert af_optimizer is None
    optimized = {id(p) for g in replica.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in replica.model.model.activations.parameters()}
    assert not any(p.requires_grad for p in replica.model.model.activations.parameters())


def test_stage_two_fine_tunes_the_bank_when_af_lr_is_set(tmp_path):
    _, (replica,), af_optimizer = stage_two_replicas(tmp_path, af_lr=0.05)
    assert af_optimizer is not None and af_optimizer.defaults["lr"] == 0.05
    assert all(p.requires_grad for p in replica.model.model.activations.parameters())


def test_stage_two_refuses_a_bank_that_does_not_fit(tmp_path):
    torch.manual_seed(0)
    afgpt.ActivationBank.from_model(afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-spline"))).save(
        tmp_path / "bank")
    cfg = TrainConfig(af_type="spline;att-linear", num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
                      seq_length=16, af_file=str(tmp_path / "bank"))
    run_data = training.RunData(np.zeros(1000, dtype=np.uint16), np.zeros(100, dtype=np.uint16), None, 97, None)
    AcceleratorState._reset_state()
    with pytest.raises(ValueError, match="attention activation: the bank holds 'spline'"):
        training.build_replica_set(cfg, run_data, Accelerator(mixed_precision="no"))


def test_stage_one_resumes_exactly(tmp_path, shared_data, monkeypatch):
    """Replicas, their optimizers and data streams, and the shared activations all come back from a checkpoint."""
    fields = dict(af_type="spline;att-spline", n_models=2, staggered_starts=2, max_steps=12, save_steps=4,
                  eval_steps=12, logging_steps=2, warmup_steps=2, cooldown_steps=4)
    reference = train(tiny_run(tmp_path / "a", shared_data, **fields))
    real_step, calls = training.train_step, {"n": 0}

    def killed_at_step_ten(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    cfg = tiny_run(tmp_path / "b", shared_data, **fields)
    monkeypatch.setattr(loop, "train_step", killed_at_step_ten)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = train(cfg, resume=True)
    assert (resumed["train_loss"], resumed["val_loss"]) == (reference["train_loss"], reference["val_loss"])

    def losses(run):  # every replica's loss and learning rate at every logged step (speeds differ, of course)
        return [(r["step"], r["replica"], r["loss"], r["lr"]) for r in train_records(run)]

    assert losses(tmp_path / "b" / "run") == losses(tmp_path / "a" / "run")
