"""Training AfGPT: an Accelerate loop with lm-afs optimizers and schedules, resumable checkpoints,
logs, metrics and plots; and the glue to train AfGPT with transformers.Trainer instead.

A run directory holds everything a paper needs: train_config.json, the tokenizer, the final model
(loadable with AutoModelForCausalLM.from_pretrained(run_dir)), the learned activations, train.log,
metrics.jsonl, plots/*.png, and checkpoint/ (the latest resumable state).
"""
import contextlib
import glob
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback

from . import data as data_lib
from .activations import ACTIVATION_NAMES
from .atomic import replace_directory, restore_interrupted, write_text_atomically
from .bank import ActivationBank
from .configuration_afgpt import AfGPTConfig
from .ensemble import Replica, average_shared_gradients, build_replicas, schedule_offsets, start_steps
from .hub import FILE_SUFFIXES as ACTIVATION_FILE_SUFFIXES, load_activations
from .losses import token_accuracy
from .modeling_afgpt import AfGPTForCausalLM
from .paths import looks_like_path
from .plotting import plot_activation_magnitudes, plot_activations, plot_training_curves

LR_SCHEDULES = ("trap", "warmup", "cos")
COS_MIN_FACTOR = 5e-4
GPT2_VOCAB, GPT2_SEPARATOR = 50304, 50256  # lm-afs's FineWeb shards: GPT-2 BPE padded to 50304, <|endoftext|>
WARMUP_PERCENT, COOLDOWN_PERCENT = 10, 50  # of max_steps, for warmup/cooldown left unset (200 steps: 20 and 100)
POSITIVE_FIELDS = ("max_steps", "per_device_train_batch_size", "seq_length", "gradient_accumulation_steps",
                   "logging_steps", "eval_steps", "save_steps", "eval_batches", "val_tokens")
RESUMABLE_FIELDS = ("max_steps", "logging_steps", "eval_steps", "save_steps", "save_af_steps", "plotting_level",
                    "log_file")
logger = logging.getLogger("afgpt")


def option(default, help_text: str):
    """A TrainConfig field with its `afgpt train --help` text (transformers.TrainingArguments' convention)."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as train_config.json in the run directory.

    Defaults train a small model on the built-in corpus in a few minutes on two CPU cores.
    Optimisation defaults are lm-afs's (Adam betas (0.8, 0.95), activations with their own Adam).
    warmup_steps and cooldown_steps left unset (None) become 10% and 50% of max_steps, so any run
    length works; train_config.json records the values that ran. Every setting is checked here
    (whether local inputs exist, when train() starts), before any data is read or tokenizer trained.

    A --resume may change only RESUMABLE_FIELDS: max_steps (train longer; the schedule then uses
    the new max_steps, with the run's warmup and cooldown unless given), the logging, evaluation
    and saving cadence, plotting_level and log_file; any other change is refused.
    """

    output_dir: str = option("runs/afgpt", "run directory; `afgpt train` without this flag starts a new run in "
                                           "runs/<date-time>, and --resume without it looks in the default")
    # data
    data: str = option(data_lib.BUILTIN_PYDOC,
                       "training text: a .txt/.jsonl/.json(.gz) file or folder, 'builtin:pydoc' (Python's "
                       "documentation, on every machine), a Hugging Face dataset name, or a glob of .bin token "
                       "shards")
    val_data: str | None = option(None, "glob of .bin validation shards, needed with .bin --data (default: none; "
                                        "text data keeps its first --val-tokens tokens for validation)")
    text_field: str = option("text", "field that holds the text in .jsonl/.json records and Hub datasets")
    tokenizer: str | None = option(None, "tokenizer folder or Hub name (default: train a byte-level BPE of "
                                         "--vocab-size tokens on the data; for .bin shards, the tokenizer "
                                         "`afgpt prepare` saved beside them, else GPT-2's)")
    vocab_size: int = option(data_lib.DEFAULT_VOCAB_SIZE, "size of the BPE tokenizer trained on the data when "
                                                          "there is no --tokenizer")
    val_tokens: int = option(32768, "tokens of text data held out for validation")
    # model
    model_name_or_path: str | None = option(None, "continue from a saved AfGPT (folder or Hub name) instead of a "
                                                  "fresh model; the model flags below are then unused (default: "
                                                  "a fresh model)")
    hidden_size: int = option(128, "model width")
    num_hidden_layers: int = option(4, "number of transformer layers")
    num_attention_heads: int = option(4, "attention heads; they must divide --hidden-size into an even head size")
    af_type: str = option("gelu;att-linear",
                          "activation spec '<mlp>;att-<att>', e.g. 'gelu;att-linear' (baseline) or "
                          "'spline;att-spline'; names: " + " ".join(ACTIVATION_NAMES) + ", and att-none")
    af_layer_specific: int = option(1, "0 one activation per slot shared by all layers, 1 one per layer, 2 first "
                                       "and last layers own theirs and the middle layers share one")
    af_range: float = option(15.0, "splines: anchors evenly spaced on [-af_range, af_range]")
    af_n_anchors: int = option(64, "splines: number of anchors")
    af_init: float = option(0.01, "splines: initial constant value, or -1 to start as the identity")
    context_size: int | None = option(None, "sliding attention window in tokens (default: full causal attention)")
    doc_masking: bool = option(True, "keep attention inside documents (lm-afs)")
    # optimisation
    max_steps: int = option(200, "optimizer steps (the default is ~4 epochs of the built-in corpus; more only "
                                 "memorises it); --resume may raise it to train longer")
    per_device_train_batch_size: int = option(16, "sequences per micro-batch and process")
    seq_length: int = option(128, "tokens per sequence")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    learning_rate: float = option(3e-3, "peak learning rate of the weights (lm-afs uses 6e-4 for 16M parameters; "
                                        "tiny models take more)")
    adam_beta1: float = option(0.8, "the weights' Adam beta1")
    adam_beta2: float = option(0.95, "the weights' Adam beta2")
    weight_decay: float = option(0.0, "AdamW weight decay of the weight matrices (norm gains, biases, scalars and "
                                      "activations are never decayed)")
    lr_scheduler_type: str = option("trap", "trap (warmup, constant, linear cooldown), warmup (warmup, then "
                                            "constant) or cos (warmup, then cosine decay)")
    warmup_steps: int | None = option(None, "linear warmup steps (default: 10% of --max-steps)")
    cooldown_steps: int | None = option(None, "trap: linear cooldown steps at the end (default: 50% of "
                                              "--max-steps)")
    max_grad_norm: float = option(0.0, "gradient clipping norm (0: no clipping)")
    af_lr: float = option(0.1, "activation learning rate: > 0 Adam, < 0 SGD with |af_lr|, 0 frozen")
    af_adam_beta1: float = option(0.99, "the activations' Adam beta1")
    af_adam_beta2: float = option(0.999, "the activations' Adam beta2")
    af_file: str | None = option(None, "stage II: learned activations to load (bank dir, run dir, lm-afs ptAf "
                                       ".pt/.csv, or Hub repo id), frozen when --af-lr is 0 (default: none)")
    # stage I: replicas sharing the learnable activations (lm-afs's multi-model training)
    n_models: int = option(1, "stage I: number of replicas sharing the learnable activations")
    staggered_starts: int = option(2, "stage I: 0 all start at once, 1 staggered starts with a common schedule, "
                                      "2 staggered starts, each replica with its own schedule")
    same_data_across_models: bool = option(False, "stage I: all replicas read the same batches")
    same_init_across_models: bool = option(False, "stage I: all replicas start from replica 0's weights")
    mixed_precision: str = option("no", "'no' (fp32) or 'bf16' autocast (fast on GPUs and on CPUs with "
                                        "AVX-512/AMX)")
    seed: int = option(0, "random seed (replica m of stage I uses seed + m)")
    # logging and checkpoints
    logging_steps: int = option(10, "log the training loss every N steps")
    eval_steps: int = option(50, "validate and plot every N steps")
    eval_batches: int = option(8, "validation batches per evaluation")
    save_steps: int = option(100, "save a resumable checkpoint every N steps")
    save_af_steps: int = option(0, "also save the activations every N steps into activation_snapshots/ (0: only "
                                   "at the end)")
    plotting_level: int = option(2, "0 no plots, 1 loss/accuracy and activations, 2 + activation magnitudes")
    run_name: str = option("", "name in plot titles and in the activations' provenance (default: the output "
                               "directory)")
    log_file: str | None = option(None, "log file (default: <output-dir>/train.log)")

    def __post_init__(self):
        for name in POSITIVE_FIELDS:  # first: the checks below compare with these
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        # left unset: scaled to max_steps here, and on --resume the run's saved values are kept
        self.scaled_defaults = {name for name in ("warmup_steps", "cooldown_steps") if getattr(self, name) is None}
        if self.warmup_steps is None:
            self.warmup_steps = self.max_steps * WARMUP_PERCENT // 100
        if self.cooldown_steps is None:
            self.cooldown_steps = self.max_steps * COOLDOWN_PERCENT // 100
        self._check_schedule()
        if self.plotting_level not in (0, 1, 2):
            raise ValueError(f"plotting_level={self.plotting_level}: use 0 (none), 1 (curves, activations) or 2 "
                             "(+ activation magnitudes)")
        if self.save_af_steps < 0:
            raise ValueError(f"save_af_steps={self.save_af_steps} must be >= 0 (0 saves only the final activations)")
        start_steps(self.n_models, self.max_steps, self.staggered_starts)  # validates both
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: use 'no' or 'bf16'")
        if self.data.endswith(".bin") and not self.val_data:
            raise ValueError("training on .bin shards needs val_data (--val-data, a glob of validation shards)")
        self.model_config(vocab_size=1)  # AfGPTConfig checks the model fields, with its own messages

    def _check_schedule(self) -> None:
        """The learning-rate schedule must fit in max_steps; only trap has a cooldown."""
        if self.lr_scheduler_type not in LR_SCHEDULES:
            raise ValueError(f"lr_scheduler_type={self.lr_scheduler_type!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if self.warmup_steps < 0 or self.cooldown_steps < 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) and cooldown_steps ({self.cooldown_steps}) must be "
                             ">= 0; or leave them unset (10% and 50% of max_steps)")
        if self.lr_scheduler_type == "trap" and self.warmup_steps + self.cooldown_steps > self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) + cooldown_steps ({self.cooldown_steps}) exceed max_steps "
                f"({self.max_steps}): lower them, leave them unset (10% and 50% of max_steps), or raise max_steps")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps}): lower it, "
                             "leave it unset (10% of max_steps), or raise max_steps")

    def model_config(self, vocab_size: int, af_range: float | None = None, af_n_anchors: int | None = None,
                     **kwargs) -> AfGPTConfig:
        """The AfGPTConfig of a fresh model of this run; a stage II bank may set the anchor grid."""
        return AfGPTConfig(
            vocab_size=vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, max_position_embeddings=self.seq_length,
            af_type=self.af_type, af_layer_specific=self.af_layer_specific,
            af_range=self.af_range if af_range is None else af_range,
            af_n_anchors=self.af_n_anchors if af_n_anchors is None else af_n_anchors, af_init=self.af_init,
            context_size=self.context_size, **kwargs)

    def lr_factor(self, step: int) -> float:
        """The schedule's multiplier at `step` (0 before a replica's schedule starts)."""
        return lr_factor(step, self.lr_scheduler_type, self.max_steps, self.warmup_steps, self.cooldown_steps)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        return cls(**json.loads(Path(path).read_text()))


def lr_factor(step: int, schedule: str, max_steps: int, warmup: int, cooldown: int) -> float:
    """lm-afs's learning-rate multiplier at `step` (0-based): linear warmup, then trap/warmup/cos."""
    if step < 0:
        return 0.0
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "warmup":
        return 1.0
    if schedule == "cos":
        progress = (step - warmup) / max(1, max_steps - warmup)
        return COS_MIN_FACTOR + 0.5 * (1 - COS_MIN_FACTOR) * (1 + math.cos(math.pi * progress))
    if step < max_steps - cooldown:
        return 1.0
    return (max_steps - step) / cooldown


def split_parameters(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(weights, activation parameters) of an AfGPT model; frozen parameters are left out."""
    activation_ids = {id(p) for p in model.base_model.activations.parameters()}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in activation_ids]
    activations = [p for p in model.base_model.activations.parameters() if p.requires_grad]
    return weights, activations


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """The parameters weight decay applies to: the matrices among those transformers.Trainer decays.

    Trainer spares norms and biases (by layer type and name); AfGPT's vectors and scalars (skip weights,
    mixing lambdas, pre-activation scales) are gains too, so they are spared as well. One rule for
    the afgpt loop and AfTrainer.
    """
    trainer_rule = Trainer.get_decay_parameter_names(None, model)  # reads no Trainer state
    return {name for name in trainer_rule if model.get_parameter(name).dim() >= 2}


def weight_groups(model: torch.nn.Module, weight_decay: float, decay: set[str]) -> list[dict]:
    """The trainable parameters except the activations, as optimizer groups: the `decay` names, the rest undecayed."""
    weights, _ = split_parameters(model)
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [{"params": [p for p in weights if names[id(p)] in decay], "weight_decay": weight_decay},
              {"params": [p for p in weights if names[id(p)] not in decay], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def weight_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay, on the matrices) over every trainable parameter except the activations."""
    return torch.optim.AdamW(weight_groups(model, cfg.weight_decay, decay_parameter_names(model)),
                             lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2))


def activation_optimizer(activations: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer | None:
    """The activations' own optimizer: Adam (af_lr > 0), SGD with |af_lr| (af_lr < 0), or none (frozen)."""
    if cfg.af_lr == 0:
        activations.requires_grad_(False)
    params = [p for p in activations.parameters() if p.requires_grad]
    if not params:
        return None
    if cfg.af_lr > 0:
        return torch.optim.Adam(params, lr=cfg.af_lr, betas=(cfg.af_adam_beta1, cfg.af_adam_beta2))
    return torch.optim.SGD(params, lr=abs(cfg.af_lr))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class ActivationMagnitudes:
    """Records mean and max |pre-activation| of every layer's MLP and attention slot via forward hooks."""

    def __init__(self, model: torch.nn.Module):
        self.values: dict[tuple[int, str], tuple[float, float]] = {}
        self.handles = []
        for i, layer in enumerate(model.base_model.layers):
            self._watch(layer.mlp.fc, i, "mlp")
            if layer.attn.pre_activation is not None:
                self._watch(layer.attn.pre_activation, i, "att")

    def _watch(self, module: torch.nn.Module, layer: int, slot: str) -> None:
        def hook(_module, _inputs, output):
            x = output.detach().abs().float()
            self.values[(layer, slot)] = (x.mean().item(), x.max().item())

        self.handles.append(module.register_forward_hook(hook))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def records(self, step: int) -> list[dict]:
        return [{"kind": "act", "step": step, "layer": layer, "slot": slot, "mean_abs": mean, "max_abs": peak}
                for (layer, slot), (mean, peak) in sorted(self.values.items())]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, max_batches: int) -> tuple[float, float]:
    """Mean validation loss and token accuracy over up to `max_batches` fixed batches."""
    was_training = model.training
    model.eval()
    losses, accuracies = [], []
    for i, (input_ids, labels) in enumerate(batches):
        if i == max_batches:
            break
        out = model(input_ids=input_ids, shift_labels=labels, use_cache=False)
        losses.append(out.loss.item())
        accuracies.append(token_accuracy(out.logits, labels).item())
    model.train(was_training)
    return sum(losses) / len(losses), sum(accuracies) / len(accuracies)


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the run stopped before the bad update."""


@dataclass
class RunState:
    """The loop's own progress, checkpointed next to model, optimizers and data position."""

    step: int = 0
    elapsed: float = 0.0
    history: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"step": self.step, "elapsed": self.elapsed, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.elapsed, self.history = state["step"], state["elapsed"], state["history"]


@dataclass
class RunData:
    """Token streams and tokenizer of a run."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: PreTrainedTokenizerBase | None
    vocab_size: int
    doc_separator: int | None


def prepare_run_directory(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path:
    """Create the run directory; refuse to touch an existing run unless resuming or overwriting."""
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()):
        if resume:
            restore_interrupted(out / "checkpoint", out / "checkpoint.old")  # killed mid save_checkpoint
            if not (out / "checkpoint").is_dir():
                raise FileNotFoundError(f"--resume: no checkpoint in {out} (expected {out / 'checkpoint'})")
            return out
        if not overwrite:
            raise FileExistsError(
                f"output directory {out} already holds a run: pass --resume to continue it, --overwrite to "
                "replace it, or choose another --output-dir")
        shutil.rmtree(out)
    elif resume:
        raise FileNotFoundError(f"--resume: {out} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_data(cfg: TrainConfig, out: Path, is_main: bool, wait) -> RunData:
    """Token shards for training and validation: read given .bin shards, or tokenize a text source."""
    if cfg.data.endswith(".bin"):
        return load_shards(cfg)
    token_dir = out / "tokens"
    if is_main and not (token_dir / "tokenizer.json").exists():
        if cfg.tokenizer:
            tokenizer = data_lib.load_tokenizer(cfg.tokenizer)
        else:
            logger.info(f"training a byte-level BPE tokenizer ({cfg.vocab_size} tokens) on {cfg.data}")
            tokenizer = data_lib.train_tokenizer(data_lib.iter_texts(cfg.data, cfg.text_field), cfg.vocab_size)
        data_lib.prepare(data_lib.iter_texts(cfg.data, cfg.text_field), tokenizer, token_dir,
                         val_tokens=cfg.val_tokens)
    wait()
    tokenizer = data_lib.load_tokenizer(token_dir)
    vocab = padded_vocab(len(tokenizer))
    train = data_lib.load_tokens(sorted(token_dir.glob("*_train_*.bin")), vocab_size=vocab)
    val = data_lib.load_tokens(sorted(token_dir.glob("*_val_*.bin")), vocab_size=vocab)
    return RunData(train, val, tokenizer, vocab, tokenizer.eos_token_id if cfg.doc_masking else None)


def load_shards(cfg: TrainConfig) -> RunData:
    """.bin shards with the tokenizer that made them: the one `afgpt prepare` recorded beside them (or
    --tokenizer, checked against that record); shards without a record are taken to be lm-afs's GPT-2 tokens."""
    record = shard_record(cfg)
    if record is None and not cfg.tokenizer:
        logger.info(f"no {data_lib.TOKENS_FILE} beside the .bin shards (not made by `afgpt prepare`): taking them "
                    f"to be GPT-2 tokens like lm-afs's FineWeb shards (vocabulary {GPT2_VOCAB}, document separator "
                    f"{GPT2_SEPARATOR}); pass --tokenizer if another tokenizer made them")
        tokenizer, vocab, separator, source = None, GPT2_VOCAB, GPT2_SEPARATOR, "GPT-2's, assumed"
    else:
        tokenizer = data_lib.load_tokenizer(cfg.tokenizer or record[0])
        vocab, separator, source = padded_vocab(len(tokenizer)), tokenizer.eos_token_id, f"of {tokenizer.name_or_path}"
        if record is not None:
            check_recorded_tokenizer(tokenizer, *record)
    train, val = (data_lib.load_tokens(pattern) for pattern in (cfg.data, cfg.val_data))
    for pattern, tokens in ((cfg.data, train), (cfg.val_data, val)):
        top = int(tokens.max()) if tokens.size else -1
        if top >= vocab:
            raise ValueError(f"{pattern}: token id {top} >= vocab size {vocab} (the tokenizer's, {source}): another "
                             "tokenizer made these shards; pass that one with --tokenizer")
    return RunData(train, val, tokenizer, vocab, separator if cfg.doc_masking else None)


def shard_record(cfg: TrainConfig) -> tuple[Path, dict] | None:
    """The folder and tokens.json record of the training and validation shards, which must agree; None without one."""
    folders = sorted({Path(p).parent for pattern in (cfg.data, cfg.val_data)
                      for p in glob.glob(os.path.expanduser(pattern))})
    records = {folder: data_lib.read_token_metadata(folder) for folder in folders}
    kinds = {None if r is None else (r["eos_token_id"], r["vocab_size"]) for r in records.values()}
    if len(kinds) > 1:
        found = "; ".join(f"{folder}: " + ("no record" if r is None else f"eos id {r['eos_token_id']}, "
                                                                          f"{r['vocab_size']} tokens")
                          for folder, r in records.items())
        raise ValueError(f"the training and validation shards come from different tokenizers ({found}, from "
                         f"{data_lib.TOKENS_FILE}): make both with one `afgpt prepare` run")
    return next(((folder, r) for folder, r in records.items() if r is not None), None)


def check_recorded_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path, record: dict) -> None:
    """--tokenizer must be the one that made the shards: same document separator and vocabulary size."""
    given, recorded = (tokenizer.eos_token_id, len(tokenizer)), (record["eos_token_id"], record["vocab_size"])
    if given != recorded:
        raise ValueError(
            f"--tokenizer {tokenizer.name_or_path} (eos id {given[0]}, {given[1]} tokens) is not the tokenizer that "
            f"made the shards in {folder} (eos id {recorded[0]}, {recorded[1]} tokens, recorded in "
            f"{folder / data_lib.TOKENS_FILE}): drop --tokenizer to use the one saved beside the shards, or "
            "re-run `afgpt prepare` with this tokenizer")


def padded_vocab(n: int) -> int:
    """Round the vocabulary up to a multiple of 64 (lm-afs pads GPT-2's 50257 to 50304) for fast matmuls."""
    return (n + 63) // 64 * 64


def build_model(cfg: TrainConfig, run_data: RunData, bank: ActivationBank | None = None) -> AfGPTForCausalLM:
    """A fresh AfGPT as `cfg` describes (or the saved one it names); a stage II bank sets the anchor grid."""
    if cfg.model_name_or_path:
        model = AfGPTForCausalLM.from_pretrained(cfg.model_name_or_path)
        if model.config.vocab_size < run_data.vocab_size:
            raise ValueError(
                f"model {cfg.model_name_or_path} has vocab_size {model.config.vocab_size} but the tokenizer has "
                f"{run_data.vocab_size} tokens: use the tokenizer the model was trained with")
        return model
    grid = bank.config if bank is not None else cfg
    config = cfg.model_config(
        run_data.vocab_size, af_range=grid.af_range, af_n_anchors=grid.af_n_anchors,
        doc_separator_token_id=run_data.doc_separator,
        eos_token_id=run_data.tokenizer.eos_token_id if run_data.tokenizer else None,
        bos_token_id=run_data.tokenizer.bos_token_id if run_data.tokenizer else None)
    return AfGPTForCausalLM(config)


def load_bank(cfg: TrainConfig) -> ActivationBank | None:
    """Stage II: the learned activations named by --af-file, checked against the requested model."""
    if not cfg.af_file:
        return None
    bank = load_activations(cfg.af_file, num_hidden_layers=cfg.num_hidden_layers, af_type=cfg.af_type,
                            af_layer_specific=cfg.af_layer_specific)
    mode = "frozen" if cfg.af_lr == 0 else f"fine-tuned with af_lr {cfg.af_lr}"
    logger.info(f"loaded activations from {cfg.af_file} ({bank.config.af_type}, {mode})")
    return bank


def build_replica_set(cfg: TrainConfig, run_data: RunData, accelerator: Accelerator
                      ) -> tuple[list[Replica], torch.optim.Optimizer | None]:
    """The run's models (one, or stage I replicas sharing their activations) with optimizers and data.

    Replica m draws its weights under seed + m and reads data stream m; with one model this is plain
    training. Everything is passed through `accelerator.prepare`.
    """
    if cfg.n_models > 1 and accelerator.num_processes > 1:
        raise ValueError(f"n_models={cfg.n_models}: stage I replicas train in one process; launch without "
                         "multiple processes (or train one model per process with n_models=1)")
    bank = load_bank(cfg)

    def make_model(m: int) -> AfGPTForCausalLM:
        set_seed(cfg.seed + m)
        return build_model(cfg, run_data, bank)

    models = build_replicas(make_model, cfg.n_models, cfg.same_init_across_models)
    if bank is not None:
        bank.load_into(models[0], freeze=cfg.af_lr == 0)  # replica 0's activations are everyone's
    af_optimizer = activation_optimizer(models[0].base_model.activations, cfg)
    optimizers = [weight_optimizer(model, cfg) for model in models]
    prepared = accelerator.prepare(*models, *optimizers, *([af_optimizer] if af_optimizer else []))
    models, optimizers = prepared[:cfg.n_models], prepared[cfg.n_models:2 * cfg.n_models]
    af_optimizer = prepared[-1] if af_optimizer else None

    streams = [data_lib.TokenBatches(run_data.train, cfg.per_device_train_batch_size, cfg.seq_length, seed=cfg.seed,
                                     stream=m, rank=accelerator.process_index, world_size=accelerator.num_processes)
               for m in range(1 if cfg.same_data_across_models else cfg.n_models)]
    starts = start_steps(cfg.n_models, cfg.max_steps, cfg.staggered_starts)
    offsets = schedule_offsets(starts, cfg.staggered_starts)
    replicas = [Replica(m, models[m], optimizers[m], streams[m % len(streams)], starts[m], offsets[m])
                for m in range(cfg.n_models)]
    return replicas, af_optimizer


def setup_logging(log_file: Path, is_main: bool) -> None:
    """Log to the console and to the run's log file (main process only)."""
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.handlers.clear()
    logger.propagate = False
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if is_main:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)


class MetricsWriter:
    """Appends records to metrics.jsonl (main process) and keeps them for plots."""

    def __init__(self, path: Path, history: list, enabled: bool):
        self.path, self.history, self.enabled = path, history, enabled

    def write(self, *records: dict) -> None:
        self.history.extend(records)
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record) + "\n")

    def rewrite(self) -> None:
        """After a resume, metrics.jsonl must match the restored history (drop lines past the checkpoint)."""
        if self.enabled:
            write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in self.history))


def save_checkpoint(accelerator: Accelerator, out: Path) -> None:
    """Write the full training state to checkpoint/ atomically: a crash leaves the previous one intact."""
    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_directory(tmp, final, old)
    accelerator.wait_for_everyone()


def save_plots(model: torch.nn.Module, history: list, plots: Path, cfg: TrainConfig) -> None:
    """The run's figures, as many as `plotting_level` asks for."""
    if cfg.plotting_level == 0:
        return
    plots.mkdir(exist_ok=True)
    title = cfg.run_name or cfg.af_type
    plot_training_curves([r for r in history if r["kind"] in ("train", "val")], plots / "training_curves.png",
                         title=title)
    plot_activations(model, plots / "activations.png", title=title)
    magnitudes = [r for r in history if r["kind"] == "act"]
    if magnitudes and cfg.plotting_level >= 2:
        plot_activation_magnitudes(magnitudes, plots / "activation_magnitudes.png",
                                   af_range=model.config.af_range)  # a stage II bank's grid, not --af-range


def save_bank(model: AfGPTForCausalLM, directory: Path, provenance: dict) -> None:
    """The model's learnable activations as a bank directory (with its model card and plot), if it has any."""
    bank = ActivationBank.from_model(model, provenance)
    if not bank.is_empty():
        bank.save(directory)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX-512 or AMX); True if unknown."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def warn_if_bf16_is_emulated(mixed_precision: str, device: torch.device) -> None:
    """bf16 autocast on an AVX2-only CPU emulates its matmuls: an AfGPT step ran 18x slower than fp32."""
    if mixed_precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning("mixed_precision='bf16' on a CPU without native bf16 matmuls (no AVX-512/AMX): "
                       "training will be many times slower than in fp32; use mixed_precision='no' here")


def check_inputs_exist(cfg: TrainConfig) -> None:
    """Missing local inputs fail before the run directory, a tokenizer or tokens are made."""
    for name in ("data", "val_data"):
        pattern = getattr(cfg, name)
        if pattern and pattern.endswith(".bin") and not glob.glob(os.path.expanduser(pattern)):
            raise FileNotFoundError(f"{name}={pattern!r}: no token shards match; check the path or glob")
    suffixes = {"data": data_lib.CORPUS_SUFFIXES, "tokenizer": data_lib.CORPUS_SUFFIXES, "model_name_or_path": (),
                "af_file": ACTIVATION_FILE_SUFFIXES}  # a missing name written like this is not a Hub id
    for name, file_suffixes in suffixes.items():
        path = getattr(cfg, name)
        if (path and not path.endswith(".bin") and path != data_lib.BUILTIN_PYDOC
                and not Path(path).expanduser().exists() and looks_like_path(path, file_suffixes)):
            raise FileNotFoundError(f"{name}={path!r} does not exist; check the path")


def resumed_config(cfg: TrainConfig, saved: TrainConfig) -> TrainConfig:
    """The settings a resumed run continues with: the saved ones, with RESUMABLE_FIELDS (and output_dir,
    however spelled) from `cfg`. Any other difference is refused; warmup/cooldown left unset keep their saved values."""
    changed = [f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(cfg, f.name)!r}" for f in fields(cfg)
               if f.name not in (*RESUMABLE_FIELDS, "output_dir", *cfg.scaled_defaults)
               and getattr(cfg, f.name) != getattr(saved, f.name)]
    if changed:
        raise ValueError(
            f"--resume: these settings differ from the run's train_config.json (saved -> given): {'; '.join(changed)}. "
            f"Resume with the run's settings (only {', '.join(RESUMABLE_FIELDS)} may change), or start a new run "
            "in another --output-dir")
    if cfg.max_steps != saved.max_steps and saved.n_models > 1 and saved.staggered_starts:
        raise ValueError(f"--resume: max_steps cannot change ({saved.max_steps} -> {cfg.max_steps}) in stage I with "
                         "staggered starts, which spread the replicas' starts over max_steps; keep max_steps "
                         f"{saved.max_steps}")
    return replace(saved, output_dir=cfg.output_dir, **{name: getattr(cfg, name) for name in RESUMABLE_FIELDS})


class Throughput:
    """Training time and tokens since the last log line. Validation, plots and checkpoints run with the
    clock paused, so tokens/s and the elapsed time count training alone, whatever the cadences."""

    def __init__(self):
        self.seconds, self.tokens = 0.0, 0
        self.started = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    @contextlib.contextmanager
    def paused(self):
        self.seconds += time.perf_counter() - self.started
        try:
            yield
        finally:
            self.started = time.perf_counter()

    def take(self) -> tuple[float, int]:
        """(seconds, tokens) of the window so far; the next window starts now."""
        now = time.perf_counter()
        window = self.seconds + now - self.started, self.tokens
        self.seconds, self.tokens, self.started = 0.0, 0, now
        return window


def final_metrics(history: list[dict], step: int, num_processes: int) -> dict:
    """What train() returns: the last training loss and validation loss/accuracy of replica 0."""
    def last(kind: str) -> dict:
        return next((r for r in reversed(history) if r["kind"] == kind and r.get("replica", 0) == 0), {})

    return {"step": step, "train_loss": last("train").get("loss"), "val_loss": last("val").get("loss"),
            "val_accuracy": last("val").get("accuracy"), "num_processes": num_processes}


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train AfGPT as `cfg` says; returns the final metrics. Multi-process under `accelerate launch`.

    With n_models > 1 this is stage I of activation discovery: replicas sharing one set of activations;
    evaluation, plots and saved files use replica 0, as in lm-afs. `resume` continues the run in
    cfg.output_dir (see TrainConfig for what may change); a finished run is left as it is.
    """
    check_inputs_exist(cfg)
    AcceleratorState._reset_state()  # a singleton: without this, a second run inherits the first's precision
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    is_main = accelerator.is_main_process
    out = prepare_run_directory(cfg, resume, overwrite) if is_main else Path(cfg.output_dir)
    accelerator.wait_for_everyone()
    if resume:
        cfg = resumed_config(cfg, TrainConfig.load(out / "train_config.json"))
    setup_logging(Path(cfg.log_file) if cfg.log_file else out / "train.log", is_main)
    if is_main and not resume:
        write_text_atomically(out / "train_config.json", json.dumps(asdict(cfg), indent=2))
    logger.info(f"afgpt train: {accelerator.num_processes} process(es), device {accelerator.device}, "
                f"mixed precision {cfg.mixed_precision}, output {out}")
    warn_if_bf16_is_emulated(cfg.mixed_precision, accelerator.device)

    set_seed(cfg.seed)
    run_data = load_data(cfg, out, is_main, accelerator.wait_for_everyone)
    replicas, af_optimizer = build_replica_set(cfg, run_data, accelerator)
    state = RunState()
    streams = list({id(r.batches): r.batches for r in replicas}.values())
    accelerator.register_for_checkpointing(*streams, state)
    model = accelerator.unwrap_model(replicas[0].model)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"model: {n_params:,} parameters, af_type {cfg.af_type}, vocab {run_data.vocab_size}, "
                f"{len(run_data.train):,} training tokens")
    if cfg.n_models > 1:
        logger.info(f"stage I: {cfg.n_models} replicas sharing their activations, start steps "
                    f"{[r.start for r in replicas]}, staggered_starts {cfg.staggered_starts}")
    if resume:
        accelerator.load_state(str(out / "checkpoint"))
        logger.info(f"resumed from {out / 'checkpoint'} at step {state.step}")
        if state.step >= cfg.max_steps:
            return finished_run(cfg, state, accelerator, out)
        if is_main:  # what this run now does: a longer max_steps, other cadences
            write_text_atomically(out / "train_config.json", json.dumps(asdict(cfg), indent=2))
    metrics = MetricsWriter(out / "metrics.jsonl", state.history, is_main)
    if resume:
        metrics.rewrite()

    provenance = {"run": cfg.run_name or str(out), "af_type": cfg.af_type, "sharing": cfg.af_layer_specific,
                  "n_models": cfg.n_models, "staggered_starts": cfg.staggered_starts, "data": cfg.data,
                  "seed": cfg.seed, "af_lr": cfg.af_lr, "af_file": cfg.af_file}
    tokens_per_step = cfg.per_device_train_batch_size * cfg.seq_length * cfg.gradient_accumulation_steps \
        * accelerator.num_processes
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not is_main, desc="training", unit="step")
    window = Throughput()
    for replica in replicas:
        replica.model.train()
    while state.step < cfg.max_steps:
        step = state.step
        results = train_step(replicas, af_optimizer, step, accelerator, cfg)
        for index, (loss, _) in results.items():
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss} at step {step + 1}{f' (replica {index})' if cfg.n_models > 1 else ''}: training "
                    f"stopped before applying that update. The last good checkpoint is {out / 'checkpoint'} (resume "
                    "with --resume); try a lower learning rate, --max-grad-norm, or mixed precision 'no'")
        state.step += 1
        window.add(len(results) * tokens_per_step)
        bar.update(1)
        last = state.step == cfg.max_steps
        if state.step % cfg.logging_steps == 0 or last:
            seconds, tokens = window.take()
            state.elapsed += seconds
            log_training(results, replicas, state, tokens / seconds, metrics, bar, cfg)
        with window.paused():  # validation, plots and checkpoints are not training time
            if state.step % cfg.eval_steps == 0 or last:
                validate(model, run_data.val, cfg, metrics, state.step)
                if is_main:
                    save_plots(model, state.history, out / "plots", cfg)
            if cfg.save_af_steps and state.step % cfg.save_af_steps == 0 and not last and is_main:
                snapshot = out / "activation_snapshots" / f"step-{state.step:06d}"
                save_bank(model, snapshot, {**provenance, "steps": state.step})
            if state.step % cfg.save_steps == 0 and not last:
                save_checkpoint(accelerator, out)
    bar.close()
    save_checkpoint(accelerator, out)
    final = final_metrics(state.history, state.step, accelerator.num_processes)
    if is_main:
        save_final(model, run_data, out, {**provenance, "steps": state.step, "final_val_loss": final["val_loss"]})
    accelerator.wait_for_everyone()
    logger.info(f"done: {json.dumps(final)}; model saved in {out}")
    accelerator.end_training()
    return final


def finished_run(cfg: TrainConfig, state: RunState, accelerator: Accelerator, out: Path) -> dict:
    """--resume of a run that already reached max_steps: nothing to train; its final metrics."""
    if state.step > cfg.max_steps:
        raise ValueError(f"--resume: the run in {out} is at step {state.step}, past max_steps={cfg.max_steps}: pass "
                         f"max_steps >= {state.step} (larger to train longer)")
    final = final_metrics(state.history, state.step, accelerator.num_processes)
    logger.info(f"the run in {out} already finished at step {state.step} (max_steps {cfg.max_steps}); nothing to do "
                f"(pass a larger --max-steps to train longer): {json.dumps(final)}")
    accelerator.end_training()
    return final


def log_training(results: dict[int, tuple[float, float]], replicas: list[Replica], state: RunState, speed: float,
                 metrics: MetricsWriter, bar: tqdm, cfg: TrainConfig) -> None:
    """The training records, progress bar and log lines of a logging step."""
    metrics.write(*train_records(results, replicas, state.step, speed, cfg))
    loss, accuracy = results[0]
    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:,.0f}",
                    **({"replicas": f"{len(results)}/{cfg.n_models}"} if cfg.n_models > 1 else {}))
    logger.info(f"Step {state.step}/{cfg.max_steps}   lossTr {loss:.4f}   accTr {100 * accuracy:.1f}   "
                f"{state.elapsed:.0f}s = {state.elapsed / state.step:.3f}s/step   {speed:,.0f} tokens/s")
    if cfg.n_models > 1:
        losses = " ".join(f"{results[r.index][0]:.4f}" if r.index in results else "-" for r in replicas)
        logger.info(f"Step {state.step}/{cfg.max_steps}   replicas {len(results)}/{cfg.n_models} active   "
                    f"lossTr per replica: {losses}")


def train_records(results: dict[int, tuple[float, float]], replicas: list[Replica], step: int, speed: float,
                  cfg: TrainConfig) -> list[dict]:
    """metrics.jsonl "train" records: one per active replica (with a "replica" field in stage I)."""
    records = []
    for replica in replicas:
        if replica.index in results:
            loss, accuracy = results[replica.index]
            record = {"kind": "train", "step": step, "loss": loss, "accuracy": accuracy,
                      "lr": replica.optimizer.param_groups[0]["lr"], "tokens_per_second": speed}
            records.append(record if cfg.n_models == 1 else {**record, "replica": replica.index})
    return records


def train_step(replicas: list[Replica], af_optimizer: torch.optim.Optimizer | None, step: int,
               accelerator: Accelerator, cfg: TrainConfig) -> dict[int, tuple[float, float]]:
    """One optimizer step of every replica active at `step`; returns {replica: (loss, accuracy)}.

    Each replica accumulates its gradients over `gradient_accumulation_steps` micro-batches; the shared
    activations' gradients are averaged over the active replicas. Nothing is updated if a loss is not finite.
    """
    active = [r for r in replicas if r.is_active(step)]
    fetched: dict[int, list] = {}  # replicas sharing a data stream see the same micro-batches
    results = {}
    for replica in active:
        if id(replica.batches) not in fetched:
            fetched[id(replica.batches)] = [next(replica.batches) for _ in range(cfg.gradient_accumulation_steps)]
        results[replica.index] = forward_backward(replica.model, fetched[id(replica.batches)], accelerator)
    if all(math.isfinite(loss) for loss, _ in results.values()):
        if af_optimizer is not None:
            average_shared_gradients([p for g in af_optimizer.param_groups for p in g["params"]], len(active))
        if cfg.max_grad_norm > 0:
            params = {id(p): p for r in active for p in r.model.parameters()}
            accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        for replica in active:
            set_learning_rate(replica.optimizer, cfg.learning_rate * cfg.lr_factor(step - replica.schedule_offset))
            replica.optimizer.step()
        if af_optimizer is not None:
            set_learning_rate(af_optimizer, abs(cfg.af_lr) * cfg.lr_factor(step))
            af_optimizer.step()
    for optimizer in [r.optimizer for r in active] + ([af_optimizer] if af_optimizer else []):
        optimizer.zero_grad(set_to_none=True)
    return results


def forward_backward(model: torch.nn.Module, micro_batches: list, accelerator: Accelerator) -> tuple[float, float]:
    """Accumulate one model's gradients over micro-batches (DDP syncs on the last); mean loss and accuracy."""
    total_loss = torch.zeros((), device=accelerator.device)
    total_acc = torch.zeros((), device=accelerator.device)
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        input_ids, labels = (t.to(accelerator.device) for t in batch)
        with contextlib.nullcontext() if i == n - 1 else accelerator.no_sync(model):
            with accelerator.autocast():
                out = model(input_ids=input_ids, shift_labels=labels, use_cache=False)
            accelerator.backward(out.loss / n)
        total_loss += out.loss.detach()
        total_acc += token_accuracy(out.logits.detach(), labels) if out.logits is not None else out.accuracy
    loss = accelerator.reduce(total_loss, "mean").item() / n
    return loss, accelerator.reduce(total_acc, "mean").item() / n


def validate(model, val_tokens, cfg: TrainConfig, metrics: MetricsWriter, step: int) -> tuple[float, float]:
    """Validation loss/accuracy on fixed batches, plus the activation magnitudes seen on them."""
    monitor = ActivationMagnitudes(model)
    try:
        batches = data_lib.val_batches(val_tokens, cfg.per_device_train_batch_size, cfg.seq_length)
        loss, accuracy = evaluate(model, batches, cfg.eval_batches)
    finally:
        monitor.close()
    record = {"kind": "val", "step": step, "loss": loss, "accuracy": accuracy}
    metrics.write(record if cfg.n_models == 1 else {**record, "replica": 0}, *monitor.records(step))
    logger.info(f"Step {step}/{cfg.max_steps}   lossVa {loss:.4f}   accVa {100 * accuracy:.1f}")
    return loss, accuracy


def save_final(model: AfGPTForCausalLM, run_data: RunData, out: Path, provenance: dict) -> None:
    """The final model and tokenizer (loadable with from_pretrained(out)) and the learned activations."""
    model.save_pretrained(out)
    if run_data.tokenizer is not None:
        run_data.tokenizer.save_pretrained(out)
    save_bank(model, out / "activations", provenance)


# ----------------------------------------------------------------------------- transformers.Trainer glue


class AfTrainer(Trainer):
    """transformers.Trainer that gives activation parameters their own learning rate and Adam betas.

    Use it like Trainer, plus `af_lr` (0 freezes the activations) and `af_betas`:
        AfTrainer(model=model, args=TrainingArguments(...), train_dataset=..., af_lr=0.1)
    The optimizer is the one `args.optim` / `optim_args` name; weight decay applies to what
    `get_decay_parameter_names` returns (decay_parameter_names: Trainer's rule, matrices only); the
    activations form their own group (af_lr, af_betas, no decay). The schedule set in
    TrainingArguments scales every group, as lm-afs does. SGD for activations (lm-afs's negative
    afLr) needs the afgpt training loop.
    """

    def __init__(self, *args, af_lr: float = 0.1, af_betas: tuple[float, float] = (0.99, 0.999), **kwargs):
        if af_lr < 0:
            raise ValueError(f"af_lr={af_lr}: AfTrainer uses Adam for activations; use `afgpt train` for SGD")
        self.af_lr, self.af_betas = af_lr, af_betas
        super().__init__(*args, **kwargs)

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        return sorted(decay_parameter_names(model))

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            if self.af_lr == 0:
                model.base_model.activations.requires_grad_(False)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = weight_groups(model, self.args.weight_decay, set(self.get_decay_parameter_names(model)))
            _, activations = split_parameters(model)
            if activations:
                betas = {"betas": self.af_betas} if "betas" in optimizer_kwargs else {}
                groups.append({"params": activations, "lr": self.af_lr, "weight_decay": 0.0, **betas})
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


class ActivationPlotCallback(TrainerCallback):
    """Plots the model's activation functions into <output_dir>/plots at every save and at the end."""

    def on_save(self, args, state, control, model=None, **kwargs):
        self._plot(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._plot(args, state, model)

    @staticmethod
    def _plot(args, state, model) -> None:
        if state.is_world_process_zero and model is not None:
            plots = Path(args.output_dir) / "plots"
            plots.mkdir(parents=True, exist_ok=True)
            plot_activations(model, plots / f"activations-step{state.global_step}.png",
                             title=f"step {state.global_step}")

