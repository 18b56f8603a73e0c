"""SuperGLUE / GLUE fine-tuning with transformers.Trainer (afgpt.evaluation.finetune) on tiny models and real data."""
import json
import math

import pytest
import torch
from transformers import (
    AutoTokenizer,
    DataCollatorForMultipleChoice,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
    ViTConfig,
)

import afgpt
from afgpt.evaluation import finetune
from afgpt.evaluation.finetune import (
    PRESETS,
    FinetuneSettings,
    MultipleChoiceModel,
    evaluate_superglue,
    finetune_task,
    results_table,
)
from afgpt.evaluation.superglue import compute_metrics, get_task, load_task

from conftest import SHARED_DATA, perturb, tiny_config

TINY = FinetuneSettings(learning_rate=1e-3, batch_size=8, micro_batch_size=4, max_epochs=1, max_length=48,
                        max_train_examples=16, max_eval_examples=16)
METRIC_RANGES = {"pearson": (-1, 1), "spearman": (-1, 1), "mcc": (-1, 1)}

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "superglue").is_dir(),
                                reason=f"staged SuperGLUE data not found under {SHARED_DATA}")


@pytest.fixture(autouse=True)
def tiny_runs(one_thread):
    """Every test here runs on one thread (conftest's one_thread)."""


def _tokenizer(name: str):
    return AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / name)


@pytest.fixture(scope="module")
def afgpt_dir(tmp_path_factory):
    """A tiny AfGPT with learned activations (spline MLP, spline attention slots), saved with the GPT-2 tokenizer."""
    tokenizer = _tokenizer("gpt2")
    torch.manual_seed(0)
    model = perturb(afgpt.AfGPTForCausalLM(tiny_config(vocab_size=len(tokenizer), af_type="spline;att-spline")))
    path = tmp_path_factory.mktemp("models") / "afgpt"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _save(model, tokenizer, path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _roberta(**overrides) -> RobertaForMaskedLM:
    torch.manual_seed(0)
    return RobertaForMaskedLM(RobertaConfig(
        vocab_size=len(_tokenizer("roberta-base")), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        **overrides))


class RecordingTrainer(finetune.Trainer):
    """Keeps each Trainer finetune_task builds, so tests can look at the fine-tuned model."""
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingTrainer.made.append(self)


@pytest.fixture
def trainers(monkeypatch):
    RecordingTrainer.made = []
    monkeypatch.setattr(finetune, "Trainer", RecordingTrainer)
    return RecordingTrainer.made


# ---------------------------------------------------------------- end to end

def test_tasks_and_seeds_give_metrics_predictions_and_summary(afgpt_dir, tmp_path):
    tasks = ("cb", "copa", "multirc", "stsb")
    overrides = {name: getattr(TINY, name) for name in ("learning_rate", "batch_size", "micro_batch_size",
                                                       "max_epochs", "max_length")}
    results = evaluate_superglue(afgpt_dir, SHARED_DATA, tmp_path, tasks=tasks, preset="quick", seeds=(1, 2),
                                 overrides={**overrides, "max_train_examples": 16, "max_eval_examples": 16},
                                 progress=False)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert results["seeds"] == [1, 2] and results["settings"]["max_length"] == 48
    assert "not comparable" in results["note"]
    for task in tasks:
        spec, summary = get_task(task), results["tasks"][task]
        assert set(summary["metrics"]) == set(summary["std"]) == set(spec.metrics)
        for seed, run in summary["seeds"].items():
            low, high = METRIC_RANGES.get(spec.metrics[0], (0, 1))
            assert all(low <= v <= high or math.isnan(v) for v in run["metrics"].values())
            assert run["predictions"] == str(tmp_path / task / f"seed{seed}" / "predictions.jsonl")
            rows = [json.loads(line) for line in open(run["predictions"])]
            assert len(rows) == run["eval_examples"] and run["epochs"] == run["best_epoch"] == 1
            recomputed = compute_metrics(task, [r["prediction"] for r in rows], [r["label"] for r in rows],
                                         [r["group"] for r in rows])
            assert recomputed == pytest.approx(run["metrics"], nan_ok=True)
        for name, mean in summary["metrics"].items():
            values = [run["metrics"][name] for run in summary["seeds"].values()]
            assert mean == pytest.approx(sum(values) / 2, nan_ok=True)
        assert not [p for p in (tmp_path / task).rglob("*") if ".checkpoints" in p.name]  # checkpoints removed
    dev = {ex.idx for ex in load_task(SHARED_DATA, "multirc", "validation")}
    multirc_rows = open(results["tasks"]["multirc"]["seeds"]["1"]["predictions"])
    assert all(json.loads(line)["idx"] in dev for line in multirc_rows)
    table = results_table(results)
    assert "| cb | f1_macro |" in table and "±" in table and table.endswith(results["note"])


def test_early_stopping_stops_when_the_dev_metric_stalls(afgpt_dir, tmp_path):
    settings = FinetuneSettings(**{**TINY.__dict__, "learning_rate": 0.0, "max_epochs": 5, "patience": 1})
    result = finetune_task(afgpt_dir, "cb", SHARED_DATA, tmp_path, settings, seed=3, progress=False)
    assert result["epochs"] == 2 and result["best_epoch"] == 1


@pytest.mark.parametrize("task", ["copa", "rte"])  # the choice wrapper (saved as a state dict) and a plain model
def test_the_best_dev_epoch_is_reloaded_and_scored(afgpt_dir, tmp_path, trainers, task):
    settings = FinetuneSettings(**{**TINY.__dict__, "learning_rate": 3e-3, "max_epochs": 4, "patience": 4,
                                   "max_train_examples": 48, "max_eval_examples": 48})
    result = finetune_task(afgpt_dir, task, SHARED_DATA, tmp_path, settings, seed=1, progress=False)
    scores = [log["eval_accuracy"] for log in trainers[-1].state.log_history if "eval_accuracy" in log]
    assert len(scores) == 4 and result["metrics"]["accuracy"] == max(scores)
    assert result["best_epoch"] == scores.index(max(scores)) + 1


def test_freeze_activations_keeps_them_while_other_weights_train(afgpt_dir, tmp_path, trainers):
    pretrained = afgpt.AfGPTForCausalLM.from_pretrained(afgpt_dir).state_dict()
    for freeze in (True, False):
        settings = FinetuneSettings(**{**TINY.__dict__, "freeze_activations": freeze, "learning_rate": 1e-2})
        finetune_task(afgpt_dir, "cb", SHARED_DATA, tmp_path, settings, seed=0, progress=False)
        tuned = trainers[-1].model
        names = afgpt.activation_module_names(tuned)
        assert any(".pre_activation" in n for n in names) and any("activations.mlp" in n for n in names)
        activation_params = {f"{name}.{p}" for name in names for p, _ in tuned.get_submodule(name).named_parameters()}
        state = tuned.state_dict()
        same = {k: torch.equal(state[k], pretrained[k]) for k in activation_params}
        assert all(same.values()) == freeze and (freeze or not any(same.values()))
        assert not torch.equal(state["model.embed_tokens.weight"], pretrained["model.embed_tokens.weight"])


def test_boolq_trains_on_a_seeded_passage_split_of_validation(afgpt_dir, tmp_path):
    spec = get_task("boolq")
    settings = FinetuneSettings(boolq_split_seed=5)
    train, dev = finetune.load_splits(SHARED_DATA, spec, settings)
    assert len(train) + len(dev) == len(load_task(SHARED_DATA, "boolq", "validation"))
    assert not {ex.texts[0] for ex in train} & {ex.texts[0] for ex in dev}
    assert finetune.load_splits(SHARED_DATA, spec, settings) == (train, dev)
    assert finetune.load_splits(SHARED_DATA, spec, FinetuneSettings(boolq_split_seed=6))[1] != dev
    result = finetune_task(afgpt_dir, "boolq", SHARED_DATA, tmp_path, TINY, seed=0, progress=False)
    assert set(result["metrics"]) == {"accuracy"} and result["eval_examples"] >= 16


def test_caps_keep_whole_multirc_questions_and_do_not_depend_on_the_seed():
    examples = load_task(SHARED_DATA, "multirc", "validation")
    capped = finetune._cap(examples, 50)
    groups = {ex.group for ex in capped}
    assert len(capped) >= 50 and len(capped) == sum(ex.group in groups for ex in examples)
    assert finetune._cap(examples, 50) == capped and finetune._cap(examples, None) == examples


# ---------------------------------------------------------------- inputs and the COPA head

def test_causal_pairs_get_a_newline_between_segments_and_roberta_its_separators():
    cb = load_task(SHARED_DATA, "cb", "validation")[:1]
    multirc = load_task(SHARED_DATA, "multirc", "validation")[:1]
    gpt2, roberta = _tokenizer("gpt2"), _tokenizer("roberta-base")
    premise, hypothesis = cb[0].texts
    (feature,) = finetune.encode(gpt2, get_task("cb"), cb, 512)
    assert gpt2.decode(feature["input_ids"]) == f"{premise}\n{hypothesis}" and feature["labels"] == cb[0].label
    (feature,) = finetune.encode(roberta, get_task("cb"), cb, 512)
    assert roberta.decode(feature["input_ids"]) == f"<s>{premise}</s></s>{hypothesis}</s>"
    paragraph, question, answer = multirc[0].texts
    (feature,) = finetune.encode(gpt2, get_task("multirc"), multirc, 512)
    assert gpt2.decode(feature["input_ids"]) == f"{paragraph}\n{question} {answer}"
    (feature,) = finetune.encode(gpt2, get_task("multirc"), multirc, 64)  # longest first: the paragraph is cut
    assert len(feature["input_ids"]) == 64 and gpt2.decode(feature["input_ids"]).endswith(f"{question} {answer}")


def test_copa_wrapper_scores_each_choice_and_takes_cross_entropy_over_them():
    tokenizer = _tokenizer("gpt2")
    spec, examples = get_task("copa"), load_task(SHARED_DATA, "copa", "validation")[:3]
    torch.manual_seed(0)
    scorer = perturb(afgpt.AfGPTForSequenceClassification(
        tiny_config(vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.eos_token_id))).eval()
    tokenizer.pad_token = tokenizer.eos_token
    batch = DataCollatorForMultipleChoice(tokenizer)(finetune.encode(tokenizer, spec, examples, 64))
    output = MultipleChoiceModel(scorer)(**batch)
    with torch.no_grad():
        expected = torch.tensor([[scorer(input_ids=tokenizer(text, return_tensors="pt").input_ids).logits.item()
                                  for text in ex.texts] for ex in examples])
    labels = torch.tensor([ex.label for ex in examples])
    assert torch.allclose(output.logits, expected, atol=1e-5)
    manual_loss = -torch.log_softmax(expected, -1)[torch.arange(3), labels].mean()
    assert torch.allclose(output.loss, manual_loss, atol=1e-5)
    assert finetune._predicted(spec, output.logits.detach().numpy()).tolist() == expected.argmax(-1).tolist()


# ---------------------------------------------------------------- other model families

def test_roberta_plain_and_patched_and_patched_gpt_neo_fine_tune(tmp_path):
    roberta, gpt2 = _tokenizer("roberta-base"), _tokenizer("gpt2")
    plain = _save(_roberta(), roberta, tmp_path / "roberta")
    patched = _save(afgpt.patch_model(_roberta(), af_type="spline;att-spline"), roberta, tmp_path / "patched")
    torch.manual_seed(0)
    neo = afgpt.patch_model(GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=len(gpt2), hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global"], 2]],
        max_position_embeddings=64, intermediate_size=64)), af_type="prelu;att-none")
    neo = _save(neo, gpt2, tmp_path / "neo")
    frozen = FinetuneSettings(**{**TINY.__dict__, "freeze_activations": True})
    for path, task, settings in [(plain, "multirc", TINY), (patched, "copa", frozen), (patched, "stsb", TINY),
                                 (neo, "cb", frozen)]:
        result = finetune_task(path, task, SHARED_DATA, tmp_path / "out", settings, seed=0, progress=False)
        assert set(result["metrics"]) == set(get_task(task).metrics)


# ---------------------------------------------------------------- bad input

def test_bad_settings_presets_and_tasks_are_refused_with_the_valid_choices(afgpt_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'squad'.*valid tasks: boolq, cb"):
        evaluate_superglue(afgpt_dir, SHARED_DATA, tmp_path, tasks=("cb", "squad"), progress=False)
    with pytest.raises(ValueError, match="unknown preset 'fast'; valid presets: full, quick"):
        evaluate_superglue(afgpt_dir, SHARED_DATA, tmp_path, preset="fast", progress=False)
    with pytest.raises(ValueError, match="unknown setting.*lr.*valid settings: .*learning_rate"):
        evaluate_superglue(afgpt_dir, SHARED_DATA, tmp_path, overrides={"lr": 1e-3}, progress=False)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        FinetuneSettings(batch_size=64, micro_batch_size=24)
    with pytest.raises(ValueError, match="max_length=128 exceeds the 64 positions"):
        finetune_task(afgpt_dir, "cb", SHARED_DATA, tmp_path, PRESETS["quick"], seed=0, progress=False)
    assert not list(tmp_path.glob("*/*/.checkpoints*"))


def test_missing_data_model_or_tokenizer_and_unusable_models_are_explained(afgpt_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder .* does not exist"):
        finetune_task(afgpt_dir, "cb", tmp_path / "nowhere", tmp_path, TINY, seed=0)
    (tmp_path / "data" / "superglue" / "CB").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="'cb' split 'train'"):
        finetune_task(afgpt_dir, "cb", tmp_path / "data", tmp_path, TINY, seed=0)
    with pytest.raises(FileNotFoundError, match="model folder .* does not exist"):
        finetune_task(str(tmp_path / "no-model"), "cb", SHARED_DATA, tmp_path, TINY, seed=0)
    afgpt.AfGPTForCausalLM(tiny_config()).save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(FileNotFoundError, match="no usable tokenizer in .*: save the one .* tokenizer.save_pretrained"):
        finetune_task(str(tmp_path / "no-tokenizer"), "cb", SHARED_DATA, tmp_path, TINY, seed=0)
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "vit")
    _tokenizer("gpt2").save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match=r"\(vit\) has no sequence-classification class"):
        finetune_task(str(tmp_path / "vit"), "cb", SHARED_DATA, tmp_path, TINY, seed=0)
    plain = _save(_roberta(), _tokenizer("roberta-base"), tmp_path / "roberta")
    with pytest.raises(ValueError, match="no afgpt activation set"):
        finetune_task(plain, "cb", SHARED_DATA, tmp_path, FinetuneSettings(**{**TINY.__dict__,
                                                                              "freeze_activations": True}), seed=0)


# ---------------------------------------------------------------- the quick preset, end to end

@pytest.mark.slow
def test_quick_preset_runs_all_superglue_tasks(tmp_path):
    tokenizer = _tokenizer("gpt2")
    model = afgpt.AfGPTForCausalLM(tiny_config(vocab_size=len(tokenizer), max_position_embeddings=128))
    path = _save(model, tokenizer, tmp_path / "model")
    results = evaluate_superglue(path, SHARED_DATA, tmp_path / "out", preset="quick", progress=False)
    assert list(results["tasks"]) == list(finetune.SUPERGLUE_TASKS) and "note" in results


def test_afgpt_eval_superglue_on_a_run_directory(tmp_path, afgpt_dir, capsys):
    import shutil

    from afgpt.cli import main
    from afgpt.plotting import read_metrics

    run = tmp_path / "run"  # an `afgpt train` run: the model folder plus train_config.json and metrics.jsonl
    shutil.copytree(afgpt_dir, run)
    (run / "train_config.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "val", "step": 4, "loss": 5.0}) + "\n")
    main(["eval-superglue", str(run), "--data", str(SHARED_DATA), "--tasks", "cb,copa", "--preset", "quick",
          "--seeds", "1,2", "--max-train-examples", "16", "--max-eval-examples", "16", "--max-epochs", "1",
          "--batch-size", "8", "--micro-batch-size", "4", "--max-length", "48", "--freeze-activations",
          "--output", str(tmp_path / "sg.json")])
    out = capsys.readouterr().out
    assert "| cb | f1_macro |" in out and "±" in out and "not comparable" in out
    results = json.loads((tmp_path / "sg.json").read_text())
    assert results["settings"]["freeze_activations"] and results["settings"]["max_epochs"] == 1
    assert results["settings"]["learning_rate"] == PRESETS["quick"].learning_rate  # not overridden: the preset's
    assert json.loads((run / "superglue" / "results.json").read_text()) == results
    records = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "superglue"]
    assert [(r["task"], r["dataset"], r["config"], r["preset"]) for r in records] == [
        ("cb", "aps/super_glue", "cb", "quick"), ("copa", "aps/super_glue", "copa", "quick")]
    assert records[0]["metrics"] == results["tasks"]["cb"]["metrics"] and records[0]["seeds"] == [1, 2]
    for seed in ("1", "2"):
        rows = [json.loads(line) for line in
                open(results["tasks"]["copa"]["seeds"][seed]["predictions"], encoding="utf-8")]
        assert compute_metrics("copa", [r["prediction"] for r in rows], [r["label"] for r in rows]) == \
            results["tasks"]["copa"]["seeds"][seed]["metrics"]
