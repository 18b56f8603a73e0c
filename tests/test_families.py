"""`afgpt train --model gpt-neo|roberta`: GPT-Neo (causal LM) and RoBERTa (masked LM) through AfGPT's loop.

Runs use tiny widths (the width flags; --size presets are checked by their parameter counts), Shakespeare, and the
local GPT-2 / roberta-base tokenizers or a BPE trained for the run.
"""
import json
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
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, GPTNeoForCausalLM,
                          RobertaForMaskedLM)

import afgpt
from afgpt import data as data_lib
from afgpt.activation_set import SlotActivation, find_activation_set
from afgpt.cli import main
from afgpt.losses import token_accuracy
from afgpt.patching import patch_model
from afgpt.training import (SIZES, FusedCausalLM, MaskedBatches, MaskedLM, RunData, TrainConfig, build_model,
                            evaluate, family_config, forward_backward, loop, parameter_counts, train)
from afgpt.training.objectives import VAL_MASK_SEED, batch_seed
from conftest import perturb, tiny_run

TOKENIZERS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizers"
AUTO = {"gpt-neo": AutoModelForCausalLM, "roberta": AutoModelForMaskedLM}


@pytest.fixture(autouse=True)
def tiny_runs(one_thread):
    """Every test here runs on one thread (conftest's one_thread)."""


@pytest.fixture(scope="module")
def roberta_tokenizer():
    if not (TOKENIZERS / "roberta-base").is_dir():
        pytest.skip("staged roberta-base tokenizer not found")
    return AutoTokenizer.from_pretrained(TOKENIZERS / "roberta-base")


def family_run(tmp_path, shared_data, model: str, **overrides) -> TrainConfig:
    fields = dict(model=model, af_type="prelu;att-none", plotting_level=0, max_steps=20, eval_steps=10,
                  save_steps=10, warmup_steps=2, cooldown_steps=8)
    return tiny_run(tmp_path, shared_data, **{**fields, **overrides})


def records(run: Path, kind: str) -> list[dict]:
    return [r for line in (run / "metrics.jsonl").read_text().splitlines() if (r := json.loads(line))["kind"] == kind]


def tiny_roberta(vocab_size: int = 50304, **patch) -> RobertaForMaskedLM:
    cfg = TrainConfig(model="roberta", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seq_length=24)
    config = family_config(cfg, vocab_size, SimpleNamespace(bos_token_id=0, eos_token_id=2, pad_token_id=1))
    model = RobertaForMaskedLM(config)
    return perturb(patch_model(model, **patch) if patch else model)


# ---------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("model, af_type, ffn_type, tokenizer", [
    ("gpt-neo", "prelu;att-none", "mlp", "gpt2"),
    ("gpt-neo", "silu;att-prelu", "kan", None),
    ("roberta", "prelu;att-none", "mlp", "roberta-base"),
    ("roberta", "spline;att-none", "kan", None),
])
def test_a_tiny_run_learns_logs_its_parameters_and_reloads(tmp_path, shared_data, model, af_type, ffn_type, tokenizer):
    cfg = family_run(tmp_path, shared_data, model, af_type=af_type, ffn_type=ffn_type,
                     tokenizer=str(TOKENIZERS / tokenizer) if tokenizer else None, learning_rate=1e-2)
    final = train(cfg)
    run = Path(cfg.output_dir)
    val = [r["loss"] for r in records(run, "val")]  # fixed batches (and, for RoBERTa, fixed masks)
    assert val[-1] < val[0] and val[-1] < np.log(len(AutoTokenizer.from_pretrained(run))) - 0.5  # it learns
    kind = "masked-token" if model == "roberta" else "next-token"
    assert {r["accuracy_kind"] for r in records(run, "train") + records(run, "val")} == {kind}

    reloaded = AUTO[model].from_pretrained(run)  # after `import afgpt`: the patched class, every weight
    assert type(reloaded).__name__ == {"gpt-neo": "AfGPTNeoForCausalLM", "roberta": "AfRobertaForMaskedLM"}[model]
    assert reloaded.config.af_type == af_type and reloaded.config.ffn_type == ffn_type
    assert reloaded.config._attn_implementation == ("eager" if model == "gpt-neo" else "sdpa")
    total, embedding = parameter_counts(reloaded)
    log = (run / "train.log").read_text()
    assert f"model: {total:,} parameters ({embedding:,} embedding, {total - embedding:,} non-embedding), {model}" in log
    if ffn_type == "kan":
        assert "KAN feed-forwards: " in log
    # the reloaded model gives the run's final validation loss (same batches, same masks)
    tokens = data_lib.load_tokens(sorted((run / "tokens").glob("*_val_*.bin")))
    objective = afgpt.training.build_objective(model, AutoTokenizer.from_pretrained(run))
    batches = objective.val_batches(data_lib.val_batches(tokens, cfg.per_device_train_batch_size, cfg.seq_length))
    assert evaluate(reloaded, batches, cfg.eval_batches, objective)[0] == pytest.approx(final["val_loss"], rel=1e-5)
    saved = load_file(run / "activations" / "activations.safetensors")  # the learned activations, as trained
    assert saved and saved.keys() == find_activation_set(reloaded).state_dict().keys()
    assert all(torch.equal(saved[name], t) for name, t in find_activation_set(reloaded).state_dict().items())


def test_plots_and_activation_files_name_the_masked_accuracy(tmp_path, shared_data):
    cfg = family_run(tmp_path, shared_data, "roberta", af_type="spline;att-none", plotting_level=2, max_steps=10)
    train(cfg)
    run = Path(cfg.output_dir)
    for plot in ("training_curves.png", "activations.png", "activation_magnitudes.png"):
        assert (run / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bank = json.loads((run / "activations" / "af_config.json").read_text())
    assert bank["af_type"] == "spline;att-none" and bank["provenance"]["model"] == "roberta"
    assert "accuracy is masked-token accuracy" in (run / "train.log").read_text()
    tokenizer = AutoTokenizer.from_pretrained(run)  # the BPE trained for the run has RoBERTa's special tokens
    assert [tokenizer.bos_token, tokenizer.pad_token, tokenizer.eos_token, tokenizer.mask_token] == \
        ["<s>", "<pad>", "</s>", "<mask>"]


def test_resumed_roberta_run_ends_exactly_like_an_uninterrupted_one(tmp_path, shared_data, monkeypatch):
    """The masks come from the batches' positions, so a resumed run masks (and ends) exactly as an uninterrupted one."""
    reference = train(family_run(tmp_path / "a", shared_data, "roberta", save_steps=5, eval_steps=20))
    real_step, calls = loop.train_step, {"n": 0}

    def crash_at_step_13(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    cfg = family_run(tmp_path / "b", shared_data, "roberta", save_steps=5, eval_steps=20)
    monkeypatch.setattr(loop, "train_step", crash_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = train(cfg, resume=True)
    assert resumed["train_loss"] == reference["train_loss"] and resumed["val_loss"] == reference["val_loss"]


def test_stage_one_gpt_neo_replicas_share_one_activation_set(tmp_path, shared_data, monkeypatch):
    built = {}
    real_build = loop.build_replica_set

    def keep(*args, **kwargs):
        built["replicas"], af_optimizer = real_build(*args, **kwargs)
        return built["replicas"], af_optimizer

    monkeypatch.setattr(loop, "build_replica_set", keep)
    cfg = family_run(tmp_path, shared_data, "gpt-neo", af_type="spline;att-spline", n_models=2, staggered_starts=0,
                     max_steps=6, eval_steps=6, save_steps=6, warmup_steps=1, cooldown_steps=2)
    train(cfg)
    first, second = (r.model for r in built["replicas"])
    assert type(first).__name__ == type(second).__name__ == "AfGPTNeoForCausalLM"  # every replica is patched
    shared = find_activation_set(first)
    assert find_activation_set(second) is shared
    assert all(m.activation_set is shared for m in second.modules() if isinstance(m, SlotActivation))
    assert not torch.equal(first.transformer.wte.weight, second.transformer.wte.weight)  # own weights
    assert not torch.all(shared.mlp[0].values == cfg.af_init)  # learned
    assert {r.get("replica") for r in records(Path(cfg.output_dir), "train")} == {0, 1}


def test_a_stage_one_bank_from_afgpt_loads_frozen_into_gpt_neo(tmp_path, shared_data):
    stage1 = tiny_run(tmp_path / "s1", shared_data, af_type="spline;att-spline", af_layer_specific=0, n_models=2,
                      staggered_starts=0, max_steps=4, eval_steps=4, save_steps=4, warmup_steps=1,
                      cooldown_steps=2, plotting_level=0)
    train(stage1)
    bank = load_file(tmp_path / "s1" / "run" / "activations" / "activations.safetensors")
    stage2 = family_run(tmp_path / "s2", shared_data, "gpt-neo", af_type="spline;att-spline", af_layer_specific=0,
                        af_file=str(tmp_path / "s1" / "run" / "activations"), af_lr=0.0, hidden_size=48,
                        num_hidden_layers=3, max_steps=4, eval_steps=4, save_steps=4, warmup_steps=1,
                        cooldown_steps=2)  # another width and depth: shared splines fit any
    train(stage2)
    model = AutoModelForCausalLM.from_pretrained(stage2.output_dir)
    activations = find_activation_set(model)
    assert torch.equal(activations.mlp[0].values, bank["mlp.0.values"])  # loaded, and frozen while training
    assert torch.equal(activations.att[0].values, bank["att.0.values"])
    assert "loaded activations from" in (Path(stage2.output_dir) / "train.log").read_text()


# ---------------------------------------------------------------------------- the objectives


def test_fused_gpt_neo_loss_and_gradients_equal_gpt_neos_own():
    cfg = TrainConfig(model="gpt-neo", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seq_length=25)
    model = perturb(patch_model(GPTNeoForCausalLM(family_config(cfg, 130, None)), af_type="prelu;att-prelu"))
    rows = torch.randint(0, 130, (3, 25), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=rows, labels=rows)  # transformers: full logits, shifts the labels itself
    out.loss.backward()
    own = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss, accuracy = FusedCausalLM()(model, rows[:, :-1], rows[:, 1:])
    loss.backward()
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert accuracy.item() == pytest.approx(token_accuracy(out.logits[:, :-1], rows[:, 1:]).item())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, own[name], rtol=1e-4, atol=1e-6, msg=name)


def test_masked_head_loss_and_gradients_equal_the_full_logits_loss(roberta_tokenizer):
    """The LM head runs only where tokens are masked: the same loss, accuracy and gradients as RobertaForMaskedLM's."""
    model = tiny_roberta(af_type="spline;att-prelu", ffn_type="kan")
    objective = MaskedLM(roberta_tokenizer)
    ids = torch.randint(4, 50000, (4, 24), generator=torch.Generator().manual_seed(1))
    inputs, labels = objective.mask(ids, seed=3)
    out = model(input_ids=inputs, labels=labels)
    out.loss.backward()
    own = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    loss, accuracy = objective(model, inputs, labels)
    loss.backward()
    scored = labels != -100
    assert seen == [scored.sum().item()]  # the head saw exactly the masked positions
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert accuracy.item() == pytest.approx(token_accuracy(out.logits, labels).item())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, own[name], rtol=1e-4, atol=1e-6, msg=name)


def test_masking_scores_15_percent_with_the_80_10_10_rule(roberta_tokenizer):
    objective = MaskedLM(roberta_tokenizer)
    ids = torch.randint(4, 50000, (64, 512), generator=torch.Generator().manual_seed(0))
    ids[:, ::50] = roberta_tokenizer.eos_token_id  # document separators
    inputs, labels = objective.mask(ids, seed=7)
    scored = labels != -100
    assert not scored[ids == roberta_tokenizer.eos_token_id].any()  # special tokens are never masked
    assert torch.equal(labels[scored], ids[scored])  # the label is the original token
    assert torch.equal(inputs[~scored], ids[~scored])  # nothing else changes
    n_scored = scored.sum().item()
    maskable = (ids != roberta_tokenizer.eos_token_id).sum().item()
    assert n_scored / maskable == pytest.approx(0.15, abs=0.006)  # 32k tokens: sd 0.002
    mask_id = roberta_tokenizer.mask_token_id
    masked, kept = (inputs[scored] == mask_id), (inputs[scored] == ids[scored])
    replaced = ~masked & ~kept
    assert masked.float().mean().item() == pytest.approx(0.8, abs=0.015)
    assert replaced.float().mean().item() == pytest.approx(0.1, abs=0.012)
    assert kept.float().mean().item() == pytest.approx(0.1, abs=0.012)


def test_masks_are_reproducible_per_batch_position_and_fixed_for_validation(roberta_tokenizer):
    objective = MaskedLM(roberta_tokenizer)
    tokens = np.random.default_rng(0).integers(4, 50000, 5000).astype(np.uint16)

    def stream():
        return MaskedBatches(data_lib.TokenBatches(tokens, 4, 16, seed=0), objective)

    a, b = stream(), stream()
    first = [next(a) for _ in range(3)]
    next(b)
    b.load_state_dict(a.state_dict())  # a resumed stream continues with the same batches and masks
    assert all(torch.equal(x, y) for x, y in zip(next(a), next(b)))
    assert all(torch.equal(x, y) for x, y in zip(first[0], next(stream())))
    assert not torch.equal(first[0][1] != -100, first[1][1] != -100)  # each batch draws its own mask

    def val():
        return list(objective.val_batches(data_lib.val_batches(tokens, 4, 16, max_tokens=200)))

    assert all(torch.equal(x, y) for pair in zip(val(), val()) for x, y in zip(*pair))
    assert batch_seed(VAL_MASK_SEED, 0) != batch_seed(VAL_MASK_SEED, 1)


def test_forward_backward_averages_gradients_of_trunk_objectives_across_processes(monkeypatch):
    """Without DDP's forward (GPT-Neo, RoBERTa objectives), the loop all-reduces the gradients itself."""
    cfg = TrainConfig(model="gpt-neo", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seq_length=16)
    model = patch_model(GPTNeoForCausalLM(family_config(cfg, 64, None)), af_type="prelu;att-none")
    reduced = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor: reduced.append(tensor) or tensor.mul_(2))
    AcceleratorState._reset_state()
    accelerator = Accelerator()
    monkeypatch.setattr(type(accelerator), "num_processes", property(lambda self: 2))
    monkeypatch.setattr(accelerator, "reduce", lambda tensor, reduction: tensor)
    rows = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    forward_backward(model, [(rows[:, :-1], rows[:, 1:])], accelerator, FusedCausalLM())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(reduced) == len(grads) and all(r is g for r, g in zip(reduced, grads))


@pytest.mark.slow
def test_gpt_neo_under_two_processes_keeps_the_replicas_identical(tmp_path, shared_data):
    script = tmp_path / "check.py"
    script.write_text(f'''
import torch, afgpt
from afgpt.training import TrainConfig, train, loop
kept = {{}}
real = loop.build_replica_set
def keep(*args, **kwargs):
    kept["replicas"], af = real(*args, **kwargs)
    return kept["replicas"], af
loop.build_replica_set = keep
real_end = loop.Accelerator.end_training
def check(self):
    model = self.unwrap_model(kept["replicas"][0].model)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    torch.distributed.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "replicas diverged"
    open(r"{tmp_path}/ok-%d" % self.process_index, "w").write("ok")
    real_end(self)
loop.Accelerator.end_training = check
train(TrainConfig(output_dir=r"{tmp_path / 'run'}", model="gpt-neo", data=r"{shared_data / 'tiny_shakespeare' / 'input.txt.gz'}",
                  vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_steps=4, warmup_steps=1,
                  cooldown_steps=2, seq_length=32, per_device_train_batch_size=4, eval_steps=4, eval_batches=1,
                  plotting_level=0))
''')
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ok-0").is_file() and (tmp_path / "ok-1").is_file()


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize("size, low, high", [("tiny", 0.95e6, 1.1e6), ("small", 10.0e6, 11.0e6)])
@pytest.mark.parametrize("model", ["afgpt", "gpt-neo", "roberta"])
def test_size_presets_have_about_1m_and_10m_non_embedding_parameters(model, size, low, high):
    cfg = TrainConfig(model=model, size=size)
    assert {name: getattr(cfg, name) for name in SIZES[size]} == SIZES[size]
    tokenizer = SimpleNamespace(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    run_data = RunData(np.zeros(0), np.zeros(0), tokenizer, 256, None)
    total, embedding = parameter_counts(build_model(cfg, run_data))
    assert low <= total - embedding <= high


def run_cli(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return str(exit_info.value.code) + capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--model", "roberta", "--tokenizer", str(TOKENIZERS / "gpt2")],
     "has no pad_token, mask_token, which RoBERTa's masked LM needs (GPT-2's tokenizer has no mask token)"),
    (["--model", "bert"], "model='bert' is not a model family afgpt trains: choose one of afgpt, gpt-neo, roberta"),
    (["--size", "huge"], "size='huge' is not a size preset: choose one of tiny, small"),
    (["--size", "small", "--hidden-size", "64"], "hidden_size=64 conflicts with size='small'"),
    (["--model", "roberta", "--doc-masking"], "only --model afgpt has doc masking"),
    (["--model", "gpt-neo", "--context-size", "16"], "only --model afgpt has context size"),
    (["--model", "gpt-neo", "--ffn-type", "swiglu"], "ffn_type='swiglu': gpt-neo takes mlp, kan, glu"),
])
def test_bad_family_settings_fail_before_any_work(tmp_path, capsys, monkeypatch, flags, message):
    def never(*args, **kwargs):
        raise AssertionError("a tokenizer or tokens were made before the settings were checked")

    monkeypatch.setattr(data_lib, "train_tokenizer", never)
    monkeypatch.setattr(data_lib, "prepare", never)
    assert message in run_cli(["train", "--output-dir", str(tmp_path / "run"), *flags], capsys)
    assert not (tmp_path / "run").exists()


def test_a_saved_model_of_another_family_is_refused_by_name(tmp_path, capsys):
    afgpt.AfGPTForCausalLM(afgpt.AfGPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2)).save_pretrained(tmp_path / "afgpt-model")
    out = run_cli(["train", "--output-dir", str(tmp_path / "run"), "--model", "gpt-neo", "--model-name-or-path",
                   str(tmp_path / "afgpt-model")], capsys)
    assert "is a 'afgpt' model, not a gpt-neo model (--model gpt-neo): pass --model afgpt" in out
    assert not (tmp_path / "run").exists()


def test_family_flags_parse_and_round_trip_through_train_config_json(tmp_path):
    from afgpt import cli

    args = cli.build_parser().parse_args(["train", "--model", "roberta", "--size", "tiny", "--ffn-type", "kan",
                                          "--kan-grid-range", "-2", "2", "--kan-width", "mlp"])
    cfg = TrainConfig(**{name: getattr(args, name) for name in cli.TRAIN_FIELDS})
    assert (cfg.model, cfg.hidden_size, cfg.kan_grid_range, cfg.doc_masking) == ("roberta", 128, (-2.0, 2.0), False)
    cfg.save(tmp_path / "train_config.json")
    assert TrainConfig.load(tmp_path / "train_config.json") == cfg
    assert TrainConfig().doc_masking is True  # AfGPT keeps document masking by default
