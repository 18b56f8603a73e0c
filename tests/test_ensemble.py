"""Stage I: replicas sharing one set of activations, staggered starts, per-replica logs."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import afgpt
from afgpt import training
from afgpt.ensemble import Replica, ReplicaPlacement, build_replicas, schedule_offsets, start_steps
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


STAGE_ONE_SCRIPT = """
import sys
import afgpt
from afgpt.training import TrainConfig, loop, train
cfg, crash_at, resume = TrainConfig.load(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "resume"
real_step = loop.train_step
def crashing_step(replicas, af_optimizer, step, accelerator, *args, **kwargs):
    if step == crash_at:
        raise KeyboardInterrupt("killed")
    trained = sorted(r.index for r in replicas if r.owned and r.is_active(step))
    with open(cfg.output_dir + f"/trained-by-rank-{accelerator.process_index}.txt", "a") as log:
        log.write(f"{step} {trained}\\n")
    return real_step(replicas, af_optimizer, step, accelerator, *args, **kwargs)
loop.train_step = crashing_step
try:
    train(cfg, resume=resume)
except KeyboardInterrupt:
    pass
"""


def launch_two_processes(tmp_path, cfg: TrainConfig, crash_at: int = -1, resume: bool = False) -> None:
    """cfg trained by `accelerate launch` on 2 CPU processes (gloo), optionally killed before step crash_at."""
    script, config = tmp_path / "stage_one.py", tmp_path / "config.json"
    script.write_text(STAGE_ONE_SCRIPT)
    cfg.save(config)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(config),
           str(crash_at), "resume" if resume else "new"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_stage_one_on_two_processes_matches_one_process_and_resumes(tmp_path, shared_data, one_thread):
    """3 replicas (uneven over 2 ranks), staggered starts with own schedules (rank 1's replica starts late),
    clipping, checkpoints, a kill and a resume: the same losses and activations as one process."""
    settings = dict(af_type="spline;att-spline", n_models=3, staggered_starts=2, max_steps=8, warmup_steps=1,
                    cooldown_steps=3, logging_steps=1, eval_steps=4, save_steps=2, max_grad_norm=0.5)
    one = tiny_run(tmp_path / "one", shared_data, **settings)
    train(one)
    two = tiny_run(tmp_path / "two", shared_data, **settings)
    launch_two_processes(tmp_path, two, crash_at=5)
    assert (tmp_path / "two" / "run" / "checkpoint").is_dir() and not (tmp_path / "two" / "run" / "model.safetensors").exists()
    launch_two_processes(tmp_path, two, resume=True)

    def losses(run_dir, kind):
        return {(r.get("replica", 0), r["step"]): (r["loss"], r["accuracy"])
                for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind}

    for kind in ("train", "val"):
        expected, got = losses(Path(one.output_dir), kind), losses(Path(two.output_dir), kind)
        assert got.keys() == expected.keys() and {m for m, _ in got} == ({0, 1, 2} if kind == "train" else {0})
        for key, (loss, accuracy) in expected.items():
            assert got[key][0] == pytest.approx(loss, rel=1e-5) and got[key][1] == pytest.approx(accuracy, abs=1e-6)
    banks = [load_file(Path(cfg.output_dir) / "activations" / "activations.safetensors") for cfg in (one, two)]
    assert banks[0].keys() == banks[1].keys()
    for name in banks[0]:
        torch.testing.assert_close(banks[1][name], banks[0][name], rtol=1e-5, atol=1e-6)
    trained = [(Path(two.output_dir) / f"trained-by-rank-{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    starts = start_steps(3, 8, 2)  # 0, 3, 5
    steps = [0, 1, 2, 3, 4, 4, 5, 6, 7]  # killed at step 5, resumed from the checkpoint of step 4
    for rank, owned in ((0, (0, 2)), (1, (1,))):  # replica m on rank m % 2
        assert trained[rank] == [f"{step} {[m for m in owned if step >= starts[m]]}" for step in steps]
    log = (Path(two.output_dir) / "train.log").read_text()
    assert "spread over 2 processes" in log and "resumed from" in log


def test_clipping_scales_all_replicas_and_the_shared_gradients_by_one_norm():
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(5))
    models = [torch.nn.Linear(3, 2) for _ in range(2)]
    for model in models:
        model.shared = shared  # registered in both, like an activation set
    for p in [shared, *(p for m in models for p in m.parameters() if p is not shared)]:
        p.grad = torch.randn_like(p) * 3
    union = {id(p): p for m in models for p in m.parameters()}
    expected = [p.grad.clone() for p in union.values()]
    total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in expected]))
    replicas = [Replica(m, model, None, iter(())) for m, model in enumerate(models)]
    loop.clip_gradients(replicas, [shared], 1.0, ReplicaPlacement(), torch.device("cpu"))
    for p, before in zip(union.values(), expected):
        torch.testing.assert_close(p.grad, before * (1.0 / (total + 1e-6)))
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in union.values()])) == pytest.approx(1.0,
                                                                                                        rel=1e-5)


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
