"""Fine-tune and evaluate a model on SuperGLUE (and the staged GLUE tasks) with transformers.Trainer.

`evaluate_superglue(model_path, data_dir, output_dir)` fine-tunes a fresh copy of the model on each task and seed,
selects the epoch with the best dev score (early stopping), and reports that epoch's dev metrics
(`afgpt.evaluation.superglue.compute_metrics`). The model folder is an `afgpt train` run, a patched GPT-Neo/RoBERTa
folder (`afgpt.patch_model` + save_pretrained) or a plain GPT-Neo/RoBERTa; it must hold the tokenizer too. It loads
with `AutoModelForSequenceClassification` (a new classification head on top of the pretrained trunk).

How inputs are built (see `afgpt.evaluation.superglue` for each task's segments):

- two segments (BoolQ, CB, RTE, WiC, GLUE pairs) are a tokenizer pair, `tokenizer(first, second)`, truncated
  longest-first to `max_length`, so a long passage cannot push the question out. A tokenizer without a sep token
  (GPT-2 style, causal models) would glue the two segments together, so the second segment starts with a newline
  instead (`SEGMENT_SEPARATOR`); not the eos token, which an AfGPT model may treat as a document boundary
  (`doc_separator_token_id`) that attention does not cross.
- MultiRC's three segments are (paragraph, question + " " + answer).
- WiC and WSC already carry their spans as marks in the text ("a *class*", "[anyone] ... *him*").
- COPA is multiple choice: each candidate text is scored by the sequence-classification model with a single output
  (`num_labels=1`), and the two scores of an example are the logits of a softmax over the choices, trained with
  cross-entropy (`MultipleChoiceModel`). The classification head is the same for every choice.
- STS-B is regression (`num_labels=1`, `problem_type="regression"`, MSE loss); predictions are the raw scores.
- BoolQ has no train split in the staged data: the official validation split is cut by passage into train/dev with
  `split_boolq` (`boolq_dev_fraction`, `boolq_split_seed`, the same split for every training seed). BoolQ scores
  are on that held-out part, so they are not comparable to the official BoolQ dev numbers.

Causal models classify from the last non-padding token, so the tokenizer's pad token (its eos token when it has
none) is written into the model config. Predictions are kept per task and seed as JSONL (idx, group, label,
prediction) so any metric can be recomputed; Trainer checkpoints live in a temporary folder that is deleted after
each run.
"""
from __future__ import annotations

import json
import random
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForMultipleChoice,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from ..atomic import write_text_atomically
from ..patching import activation_module_names
from ..paths import looks_like_path
from .runs import append_to_run
from .scoring import position_limit
from .superglue import Example, TaskSpec, compute_metrics, get_task, load_task, split_boolq

__all__ = ["FinetuneSettings", "PRESETS", "SUPERGLUE_TASKS", "MultipleChoiceModel", "finetune_task",
           "evaluate_superglue", "results_table"]

SUPERGLUE_TASKS = ("boolq", "cb", "copa", "multirc", "rte", "wic", "wsc")
SEGMENT_SEPARATOR = "\n"
QUICK_NOTE = ("quick preset: training and dev sets are capped and training is short, so these numbers are a smoke "
              "test and not comparable to full-preset runs or published scores")


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning hyperparameters; the defaults are the BabyLM evaluation pipeline's. `batch_size` is the
    effective batch: `micro_batch_size` examples per step, gradients accumulated over batch_size // micro_batch_size
    steps (so CPU memory stays small). `freeze_activations` keeps learned activations (and attention slots) fixed.
    `max_train_examples` / `max_eval_examples` cap each split to a fixed random subset (whole MultiRC questions),
    the same for every seed. BoolQ's train/dev come from its validation split (`boolq_dev_fraction` of it is dev,
    split by passage with `boolq_split_seed`)."""
    learning_rate: float = 5e-5
    batch_size: int = 64
    micro_batch_size: int = 16
    max_epochs: int = 10
    patience: int = 3
    max_length: int = 128
    freeze_activations: bool = False
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    boolq_dev_fraction: float = 0.2
    boolq_split_seed: int = 0

    def __post_init__(self):
        if self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of micro_batch_size="
                             f"{self.micro_batch_size} (>= 1): gradients are accumulated over whole micro-batches")
        for name in ("max_epochs", "patience", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_examples", "max_eval_examples"):
            if getattr(self, name) is not None and getattr(self, name) < 2:
                raise ValueError(f"{name} must be None (no cap) or >= 2, got {getattr(self, name)}")


# quick: a smoke test that runs all SuperGLUE tasks on a tiny model in minutes on CPU (capped data, two epochs; a
# higher learning rate and smaller batches so the few steps still move the model).
PRESETS: dict[str, FinetuneSettings] = {
    "full": FinetuneSettings(),
    "quick": FinetuneSettings(learning_rate=1e-4, batch_size=16, max_epochs=2, patience=2, max_train_examples=384,
                              max_eval_examples=256),
}


# ---------------------------------------------------------------- model

class MultipleChoiceModel(nn.Module):
    """A sequence-classification model with one output scores each choice; the scores of an example's choices are
    its logits (batch, n_choices), trained with cross-entropy. Takes DataCollatorForMultipleChoice batches."""

    def __init__(self, scorer: PreTrainedModel):
        super().__init__()
        if scorer.config.num_labels != 1:
            raise ValueError(f"the choice scorer needs num_labels=1, got {scorer.config.num_labels}")
        self.scorer = scorer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        batch, n_choices, length = input_ids.shape
        flat_mask = None if attention_mask is None else attention_mask.reshape(-1, length)
        scores = self.scorer(input_ids=input_ids.reshape(-1, length), attention_mask=flat_mask).logits
        logits = scores.reshape(batch, n_choices)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _num_outputs(spec: TaskSpec) -> int:
    return 1 if spec.multiple_choice or spec.label_names is None else spec.num_labels


def load_tokenizer(model_path: str):
    """The folder's tokenizer, with a pad token (eos when it has none: causal tokenizers often lack one)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError) as exc:
        raise FileNotFoundError(f"no usable tokenizer in {model_path}: save the one the model was trained with "
                                f"there, tokenizer.save_pretrained(model_path) ({type(exc).__name__}: {exc})") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {model_path} has neither a pad nor an eos token: set "
                             "tokenizer.pad_token and save it again")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(model_path: str, spec: TaskSpec, tokenizer, settings: FinetuneSettings) -> nn.Module:
    """A fresh classification (or regression / choice-scoring) model for `spec` from the pretrained folder."""
    config = AutoConfig.from_pretrained(model_path)
    extra = {"problem_type": "regression"} if spec.label_names is None else {}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=_num_outputs(spec), pad_token_id=tokenizer.pad_token_id, **extra)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise ValueError(f"{model_path} ({config.model_type}) has no sequence-classification class, which "
                         "fine-tuning needs: use an AfGPT run, a (patched) GPT-Neo or RoBERTa folder, or another "
                         "model type that AutoModelForSequenceClassification supports") from exc
    model.config.use_cache = False  # no generation: outputs are just loss and logits
    limit = position_limit(model)
    if limit is not None and settings.max_length > limit:
        raise ValueError(f"max_length={settings.max_length} exceeds the {limit} positions of {model_path}: "
                         f"override max_length with at most {limit}")
    if settings.freeze_activations:
        names = activation_module_names(model)  # ValueError for a model without learned activations
        for name in names:
            model.get_submodule(name).requires_grad_(False)
    return MultipleChoiceModel(model) if spec.multiple_choice else model


# ---------------------------------------------------------------- data

def _cap(examples: list[Example], limit: int | None) -> list[Example]:
    """A fixed random subset of about `limit` examples (whole MultiRC questions), in input order."""
    if limit is None or len(examples) <= limit:
        return examples
    keys = list(dict.fromkeys(ex.group or ex.idx for ex in examples))
    random.Random(0).shuffle(keys)
    sizes: dict = {}
    for ex in examples:
        sizes[ex.group or ex.idx] = sizes.get(ex.group or ex.idx, 0) + 1
    kept, count = set(), 0
    for key in keys:
        if count >= limit:
            break
        kept.add(key)
        count += sizes[key]
    return [ex for ex in examples if (ex.group or ex.idx) in kept]


def load_splits(data_dir, spec: TaskSpec, settings: FinetuneSettings) -> tuple[list[Example], list[Example]]:
    """(train, dev) Examples: the labeled splits (BoolQ: its validation split cut by `split_boolq`), capped."""
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist: pass the staged data root holding "
                                "superglue/ and glue/")
    if spec.name == "boolq":
        train, dev = split_boolq(load_task(data_dir, "boolq", "validation"), settings.boolq_dev_fraction,
                                 settings.boolq_split_seed)
    else:
        train, dev = load_task(data_dir, spec.name, "train"), load_task(data_dir, spec.name, "validation")
    return _cap(train, settings.max_train_examples), _cap(dev, settings.max_eval_examples)


def _segments(tokenizer, texts: tuple[str, ...]) -> tuple[str, ...]:
    if len(texts) == 1:
        return texts
    second = " ".join(texts[1:])  # MultiRC: question + answer option
    return texts[0], second if tokenizer.sep_token is not None else SEGMENT_SEPARATOR + second


def encode(tokenizer, spec: TaskSpec, examples: Sequence[Example], max_length: int) -> list[dict]:
    """Tokenized features with `labels`; a multiple-choice example holds one row per candidate."""
    features = []
    for ex in examples:
        if spec.multiple_choice:
            encoded = tokenizer(list(ex.texts), truncation=True, max_length=max_length)
        else:
            encoded = tokenizer(*_segments(tokenizer, ex.texts), truncation=True, max_length=max_length)
        features.append({**encoded, "labels": ex.label})
    return features


# ---------------------------------------------------------------- training

def _predicted(spec: TaskSpec, logits: np.ndarray) -> np.ndarray:
    return logits.reshape(-1) if spec.label_names is None else logits.argmax(-1)


def _metrics_function(spec: TaskSpec, dev: Sequence[Example]):
    groups = [ex.group for ex in dev] if spec.name == "multirc" else None
    return lambda p: compute_metrics(spec.name, _predicted(spec, p.predictions), p.label_ids, groups)


def _training_arguments(checkpoints: str, settings: FinetuneSettings, spec: TaskSpec, seed: int,
                        progress: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=checkpoints, seed=seed, learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.micro_batch_size, per_device_eval_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=settings.batch_size // settings.micro_batch_size,
        num_train_epochs=settings.max_epochs, eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch",
        save_total_limit=1, save_only_model=True, load_best_model_at_end=True,
        metric_for_best_model=spec.metrics[0], greater_is_better=True, report_to=[], disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=torch.cuda.is_available())


def _write_predictions(path: Path, dev: Sequence[Example], predictions: np.ndarray) -> None:
    rows = [{"idx": ex.idx, "group": ex.group, "label": ex.label, "prediction": p.item()}
            for ex, p in zip(dev, predictions)]
    write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


def finetune_task(model_path: str, task: str, data_dir, output_dir, settings: FinetuneSettings, seed: int, *,
                  progress: bool = True) -> dict:
    """Fine-tune `model_path` on `task` with `seed`, keep the best dev epoch, and write its dev predictions to
    output_dir/<task>/seed<seed>/predictions.jsonl. Returns metrics, predictions path, epochs trained and the best
    epoch."""
    spec = get_task(task)
    model_path = str(model_path)
    if not Path(model_path).is_dir() and looks_like_path(model_path):  # else a Hub id, for from_pretrained
        raise FileNotFoundError(f"model folder {model_path} does not exist (an `afgpt train` run or a "
                                "save_pretrained folder with its tokenizer)")
    train, dev = load_splits(data_dir, spec, settings)
    tokenizer = load_tokenizer(model_path)
    set_seed(seed)  # before the new head is initialised
    model = load_classifier(model_path, spec, tokenizer, settings)
    collator = (DataCollatorForMultipleChoice if spec.multiple_choice else DataCollatorWithPadding)(tokenizer)
    run_dir = Path(output_dir) / spec.name / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = tempfile.mkdtemp(prefix=".checkpoints-", dir=run_dir)
    try:
        trainer = Trainer(
            model=model, args=_training_arguments(checkpoints, settings, spec, seed, progress),
            train_dataset=encode(tokenizer, spec, train, settings.max_length),
            eval_dataset=encode(tokenizer, spec, dev, settings.max_length), data_collator=collator,
            compute_metrics=_metrics_function(spec, dev),
            callbacks=[EarlyStoppingCallback(early_stopping_patience=settings.patience)])
        trainer.train()
        output = trainer.predict(trainer.eval_dataset)
    finally:
        shutil.rmtree(checkpoints, ignore_errors=True)
    predictions = _predicted(spec, output.predictions)
    path = run_dir / "predictions.jsonl"
    _write_predictions(path, dev, predictions)
    state = trainer.state
    best_epoch = next(round(log["epoch"]) for log in state.log_history if log.get("step") == state.best_global_step
                      and f"eval_{spec.metrics[0]}" in log)
    return {"metrics": compute_metrics(spec.name, predictions, [ex.label for ex in dev],
                                       [ex.group for ex in dev] if spec.name == "multirc" else None),
            "predictions": str(path), "epochs": round(state.epoch),
            "best_epoch": best_epoch, "train_examples": len(train),
            "eval_examples": len(dev)}


# ---------------------------------------------------------------- all tasks

def _settings(preset: str, overrides: dict | None) -> FinetuneSettings:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    valid = {f.name for f in fields(FinetuneSettings)}
    unknown = sorted(set(overrides or {}) - valid)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; valid settings: {', '.join(sorted(valid))}")
    return replace(PRESETS[preset], **(overrides or {}))


def _summary(runs: dict[str, dict]) -> dict:
    """Mean (and, over several seeds, sample std) of each metric; the per-seed runs kept alongside."""
    names = next(iter(runs.values()))["metrics"]
    values = {name: [run["metrics"][name] for run in runs.values()] for name in names}
    summary = {"metrics": {name: statistics.fmean(v) for name, v in values.items()}}
    if len(runs) > 1:
        summary["std"] = {name: statistics.stdev(v) for name, v in values.items()}
    return {**summary, "seeds": runs}


def evaluate_superglue(model_path: str, data_dir, output_dir, tasks: Sequence[str] = SUPERGLUE_TASKS,
                       preset: str = "full", seeds: Sequence[int] = (12,), overrides: dict | None = None,
                       progress: bool = True) -> dict:
    """Fine-tune on each task and seed (`finetune_task`), summarise over seeds, and write output_dir/results.json.

    `overrides` replaces fields of the preset's FinetuneSettings. The result (JSON-able) holds the model, preset,
    settings, seeds, and per task the mean metrics, their std over several seeds, and each seed's metrics,
    predictions file and epochs; the quick preset adds a `note` that its numbers are not comparable to full runs."""
    from tqdm.auto import tqdm

    settings = _settings(preset, overrides)
    specs = [get_task(name) for name in tasks]  # unknown names fail before any training
    if not seeds:
        raise ValueError("seeds is empty: give at least one training seed")
    results = {"model": str(model_path), "preset": preset, "settings": asdict(settings), "seeds": list(seeds),
               "tasks": {}}
    if preset == "quick":
        results["note"] = QUICK_NOTE
    runs = [(spec, seed) for spec in specs for seed in seeds]
    with tqdm(runs, desc="fine-tuning", unit="run", disable=not progress) as bar:
        per_task: dict[str, dict] = {}
        for spec, seed in bar:
            bar.set_postfix(task=spec.name, seed=seed)
            per_task.setdefault(spec.name, {})[str(seed)] = finetune_task(
                model_path, spec.name, data_dir, output_dir, settings, seed, progress=progress)
    results["tasks"] = {name: _summary(task_runs) for name, task_runs in per_task.items()}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomically(Path(output_dir) / "results.json", json.dumps(results, indent=2) + "\n")
    for spec in specs:
        append_to_run(model_path, run_record(spec, results, Path(output_dir) / "results.json"))
    return results


HUB_DATASETS = {"superglue": "aps/super_glue", "glue": "nyu-mll/glue"}  # the Hub's copies, for the model card


def run_record(spec: TaskSpec, results: dict, path: Path) -> dict:
    """The metrics.jsonl record of one task's results (mean over seeds), for an `afgpt train` run directory."""
    task = results["tasks"][spec.name]
    return {"kind": "superglue", "task": spec.name, "dataset": HUB_DATASETS[spec.benchmark],
            "config": spec.name.removeprefix("glue-"), "preset": results["preset"], "seeds": results["seeds"],
            "metrics": task["metrics"], **({"std": task["std"]} if "std" in task else {}), "results": str(path)}


def results_table(results: dict) -> str:
    """A markdown table: one row per task and metric, scores in percent (mean ± std over seeds)."""
    lines = ["| task | metric | score |", "|---|---|---|"]
    for name, task in results["tasks"].items():
        for metric, mean in task["metrics"].items():
            std = task.get("std", {}).get(metric)
            score = f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"
            lines.append(f"| {name} | {metric} | {score} |")
    if "note" in results:
        lines += ["", f"Note: {results['note']}"]
    return "\n".join(lines)
