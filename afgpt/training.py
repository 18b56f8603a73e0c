"""Training AfGPT: an Accelerate loop with lm-afs optimizers and schedules, resumable checkpoints,
logs, metrics and plots; and the glue to train AfGPT with transformers.Trainer instead.

A run directory holds everything a paper needs: train_config.json, the tokenizer, the final model
(loadable with AutoModelForCausalLM.from_pretrained(run_dir)), the learned activations, train.log,
metrics.jsonl, plots/*.png, and checkpoint/ (the latest resumable state).
"""
import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback

from . import data as data_lib
from .bank import ActivationBank
from .configuration_afgpt import AfGPTConfig
from .modeling_afgpt import AfGPTForCausalLM
from .plotting import plot_activation_magnitudes, plot_activations, plot_training_curves

LR_SCHEDULES = ("trap", "warmup", "cos")
COS_MIN_FACTOR = 5e-4
logger = logging.getLogger("afgpt")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as train_config.json in the run directory.

    Defaults train a small model on the built-in corpus in a few minutes on two CPU cores.
    Optimisation defaults are lm-afs's (Adam betas (0.8, 0.95), activations with their own Adam).
    """

    output_dir: str = "runs/afgpt"
    # data
    data: str = data_lib.BUILTIN_PYDOC  # text source, or a glob of .bin token shards
    val_data: str | None = None  # glob of validation shards (with .bin training data)
    text_field: str = "text"
    tokenizer: str | None = None  # None: train a byte-level BPE of `vocab_size` on the data
    vocab_size: int = 2048
    val_tokens: int = 32768
    # model
    model_name_or_path: str | None = None  # continue from a saved AfGPT instead of a fresh one
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    af_type: str = "gelu;att-linear"
    af_layer_specific: int = 1
    af_range: float = 15.0
    af_n_anchors: int = 64
    af_init: float = 0.01
    context_size: int | None = None
    doc_masking: bool = True  # keep attention inside documents (lm-afs)
    # optimisation
    max_steps: int = 200  # ~4 epochs of the built-in corpus; more only memorises it
    per_device_train_batch_size: int = 16
    seq_length: int = 128
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-3  # lm-afs uses 6e-4 for 16M parameters; tiny models take more
    adam_beta1: float = 0.8
    adam_beta2: float = 0.95
    weight_decay: float = 0.0
    lr_scheduler_type: str = "trap"
    warmup_steps: int = 20
    cooldown_steps: int = 100
    max_grad_norm: float = 0.0  # 0 = no clipping
    af_lr: float = 0.1  # > 0 Adam, < 0 SGD with |af_lr|, 0 frozen
    af_adam_beta1: float = 0.99
    af_adam_beta2: float = 0.999
    mixed_precision: str = "no"  # "no" or "bf16"
    seed: int = 0
    # logging and checkpoints
    logging_steps: int = 10
    eval_steps: int = 50
    eval_batches: int = 8
    save_steps: int = 100
    run_name: str = ""
    log_file: str | None = None  # default: <output_dir>/train.log

    def __post_init__(self):
        if self.lr_scheduler_type not in LR_SCHEDULES:
            raise ValueError(f"lr_scheduler_type={self.lr_scheduler_type!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if self.warmup_steps + self.cooldown_steps > self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) + cooldown_steps ({self.cooldown_steps}) exceed max_steps "
                f"({self.max_steps}): shorten them or train longer")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: use 'no' or 'bf16'")
        for name in ("max_steps", "per_device_train_batch_size", "seq_length", "gradient_accumulation_steps",
                     "logging_steps", "eval_steps", "save_steps", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

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


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Adam for the weights; a separate optimizer for the activations (Adam, SGD, or none when frozen)."""
    if cfg.af_lr == 0:
        model.base_model.activations.requires_grad_(False)
    weights, activations = split_parameters(model)
    optimizers = [torch.optim.AdamW(weights, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                    weight_decay=cfg.weight_decay)]
    if activations and cfg.af_lr > 0:
        optimizers.append(torch.optim.Adam(activations, lr=cfg.af_lr, betas=(cfg.af_adam_beta1, cfg.af_adam_beta2)))
    elif activations:
        optimizers.append(torch.optim.SGD(activations, lr=abs(cfg.af_lr)))
    return optimizers


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).float().mean()


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
        tokenizer = data_lib.load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
        vocab = padded_vocab(len(tokenizer)) if tokenizer else 50304  # lm-afs: GPT-2 BPE padded to 50304
        if not cfg.val_data:
            raise ValueError("training on .bin shards needs --val-data (a glob of validation shards)")
        train = data_lib.load_tokens(cfg.data, vocab_size=vocab)
        val = data_lib.load_tokens(cfg.val_data, vocab_size=vocab)
        separator = tokenizer.eos_token_id if tokenizer else 50256
        return RunData(train, val, tokenizer, vocab, separator if cfg.doc_masking else None)
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


def padded_vocab(n: int) -> int:
    """Round the vocabulary up to a multiple of 64 (lm-afs pads GPT-2's 50257 to 50304) for fast matmuls."""
    return (n + 63) // 64 * 64


def build_model(cfg: TrainConfig, run_data: RunData) -> AfGPTForCausalLM:
    if cfg.model_name_or_path:
        model = AfGPTForCausalLM.from_pretrained(cfg.model_name_or_path)
        if model.config.vocab_size < run_data.vocab_size:
            raise ValueError(
                f"model {cfg.model_name_or_path} has vocab_size {model.config.vocab_size} but the tokenizer has "
                f"{run_data.vocab_size} tokens: use the tokenizer the model was trained with")
        return model
    config = AfGPTConfig(
        vocab_size=run_data.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, max_position_embeddings=cfg.seq_length,
        af_type=cfg.af_type, af_layer_specific=cfg.af_layer_specific, af_range=cfg.af_range,
        af_n_anchors=cfg.af_n_anchors, af_init=cfg.af_init, context_size=cfg.context_size,
        doc_separator_token_id=run_data.doc_separator,
        eos_token_id=run_data.tokenizer.eos_token_id if run_data.tokenizer else None,
        bos_token_id=run_data.tokenizer.bos_token_id if run_data.tokenizer else None)
    return AfGPTForCausalLM(config)


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
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(accelerator: Accelerator, out: Path) -> None:
    """Write the full training state to checkpoint/ atomically: a crash leaves the previous one intact."""
    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_plots(model: torch.nn.Module, history: list, plots: Path, af_range: float) -> None:
    plots.mkdir(exist_ok=True)
    plot_training_curves([r for r in history if r["kind"] in ("train", "val")], plots / "training_curves.png")
    plot_activations(model, plots / "activations.png")
    magnitudes = [r for r in history if r["kind"] == "act"]
    if magnitudes:
        plot_activation_magnitudes(magnitudes, plots / "activation_magnitudes.png", af_range=af_range)


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train AfGPT as `cfg` says; returns the final metrics. Multi-process under `accelerate launch`."""
    AcceleratorState._reset_state()  # a singleton: without this, a second run inherits the first's precision
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    is_main = accelerator.is_main_process
    out = prepare_run_directory(cfg, resume, overwrite) if is_main else Path(cfg.output_dir)
    accelerator.wait_for_everyone()
    setup_logging(Path(cfg.log_file) if cfg.log_file else out / "train.log", is_main)
    if is_main and not resume:
        atomic_write_text(out / "train_config.json", json.dumps(asdict(cfg), indent=2))
    logger.info(f"afgpt train: {accelerator.num_processes} process(es), device {accelerator.device}, "
                f"mixed precision {cfg.mixed_precision}, output {out}")

    set_seed(cfg.seed)
    run_data = load_data(cfg, out, is_main, accelerator.wait_for_everyone)
    model = build_model(cfg, run_data)
    optimizers = build_optimizers(model, cfg)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, cfg.lr_scheduler_type, cfg.max_steps, cfg.warmup_steps, cfg.cooldown_steps)) for opt in optimizers]
    batches = data_lib.TokenBatches(run_data.train, cfg.per_device_train_batch_size, cfg.seq_length, seed=cfg.seed,
                                    rank=accelerator.process_index, world_size=accelerator.num_processes)
    state = RunState()
    model, *optimizers = accelerator.prepare(model, *optimizers)
    accelerator.register_for_checkpointing(*schedulers, batches, state)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"model: {n_params:,} parameters, af_type {cfg.af_type}, vocab {run_data.vocab_size}, "
                f"{len(run_data.train):,} training tokens")
    if resume:
        accelerator.load_state(str(out / "checkpoint"))
        logger.info(f"resumed from {out / 'checkpoint'} at step {state.step}")
    metrics = MetricsWriter(out / "metrics.jsonl", state.history, is_main)
    if resume:
        metrics.rewrite()

    unwrapped = accelerator.unwrap_model(model)
    tokens_per_step = cfg.per_device_train_batch_size * cfg.seq_length * cfg.gradient_accumulation_steps \
        * accelerator.num_processes
    val_loss = val_acc = None
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not is_main, desc="training", unit="step")
    window_start, window_steps = time.perf_counter(), 0
    model.train()
    while state.step < cfg.max_steps:
        step = state.step
        loss, accuracy = train_step(model, optimizers, schedulers, batches, accelerator, cfg)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss} at step {step + 1}: training stopped before applying that update. The last good "
                f"checkpoint is {out / 'checkpoint'} (resume with --resume); try a lower learning rate, "
                "--max-grad-norm, or mixed precision 'no'")
        state.step += 1
        window_steps += 1
        bar.update(1)
        if state.step % cfg.logging_steps == 0 or state.step == cfg.max_steps:
            seconds = time.perf_counter() - window_start
            state.elapsed += seconds
            speed = window_steps * tokens_per_step / seconds
            metrics.write({"kind": "train", "step": state.step, "loss": loss, "accuracy": accuracy,
                           "lr": schedulers[0].get_last_lr()[0], "tokens_per_second": speed})
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:,.0f}")
            logger.info(f"Step {state.step}/{cfg.max_steps}   lossTr {loss:.4f}   accTr {100 * accuracy:.1f}   "
                        f"{state.elapsed:.0f}s = {state.elapsed / state.step:.3f}s/step   {speed:,.0f} tokens/s")
            window_start, window_steps = time.perf_counter(), 0
        if state.step % cfg.eval_steps == 0 or state.step == cfg.max_steps:
            val_loss, val_acc = validate(unwrapped, run_data.val, cfg, metrics, state.step)
            if is_main:
                save_plots(unwrapped, state.history, out / "plots", cfg.af_range)
            window_start = time.perf_counter()
        if state.step % cfg.save_steps == 0 and state.step < cfg.max_steps:
            save_checkpoint(accelerator, out)
            window_start = time.perf_counter()
    bar.close()
    save_checkpoint(accelerator, out)
    if is_main:
        save_final(unwrapped, run_data, out, {
            "run": str(out), "steps": state.step, "n_models": 1, "data": cfg.data, "seed": cfg.seed,
            "af_lr": cfg.af_lr, "final_val_loss": val_loss})
    accelerator.wait_for_everyone()
    final = {"step": state.step, "train_loss": loss, "val_loss": val_loss, "val_accuracy": val_acc,
             "num_processes": accelerator.num_processes}
    logger.info(f"done: {json.dumps(final)}; model saved in {out}")
    accelerator.end_training()
    return final


def train_step(model, optimizers, schedulers, batches, accelerator: Accelerator, cfg: TrainConfig) -> tuple[float, float]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns mean loss and accuracy."""
    total_loss = torch.zeros((), device=accelerator.device)
    total_acc = torch.zeros((), device=accelerator.device)
    for micro in range(cfg.gradient_accumulation_steps):
        input_ids, labels = (t.to(accelerator.device) for t in next(batches))
        last = micro == cfg.gradient_accumulation_steps - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                out = model(input_ids=input_ids, shift_labels=labels, use_cache=False)
            accelerator.backward(out.loss / cfg.gradient_accumulation_steps)
        total_loss += out.loss.detach()
        total_acc += token_accuracy(out.logits.detach(), labels)
    loss = accelerator.reduce(total_loss, "mean").item() / cfg.gradient_accumulation_steps
    if math.isfinite(loss):
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        for opt, sched in zip(optimizers, schedulers):
            opt.step()
            sched.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    accuracy = accelerator.reduce(total_acc, "mean").item() / cfg.gradient_accumulation_steps
    return loss, accuracy


def validate(model, val_tokens, cfg: TrainConfig, metrics: MetricsWriter, step: int) -> tuple[float, float]:
    """Validation loss/accuracy on fixed batches, plus the activation magnitudes seen on them."""
    monitor = ActivationMagnitudes(model)
    try:
        batches = data_lib.val_batches(val_tokens, cfg.per_device_train_batch_size, cfg.seq_length)
        loss, accuracy = evaluate(model, batches, cfg.eval_batches)
    finally:
        monitor.close()
    metrics.write({"kind": "val", "step": step, "loss": loss, "accuracy": accuracy}, *monitor.records(step))
    logger.info(f"Step {step}/{cfg.max_steps}   lossVa {loss:.4f}   accVa {100 * accuracy:.1f}")
    return loss, accuracy


def save_final(model: AfGPTForCausalLM, run_data: RunData, out: Path, provenance: dict) -> None:
    """The final model and tokenizer (loadable with from_pretrained(out)) and the learned activations."""
    model.save_pretrained(out)
    if run_data.tokenizer is not None:
        run_data.tokenizer.save_pretrained(out)
    bank = ActivationBank.from_model(model, provenance)
    if not bank.is_empty():
        bank.save(out / "activations")
        plot_activations(model, out / "activations" / "activations.png", title=model.config.af_type)


# ----------------------------------------------------------------------------- transformers.Trainer glue


class AfTrainer(Trainer):
    """transformers.Trainer that gives activation parameters their own learning rate and Adam betas.

    Use it like Trainer, plus `af_lr` (0 freezes the activations) and `af_betas`:
        AfTrainer(model=model, args=TrainingArguments(...), train_dataset=..., af_lr=0.1)
    The schedule set in TrainingArguments scales both groups, as lm-afs does. SGD for activations
    (lm-afs's negative afLr) needs the afgpt training loop.
    """

    def __init__(self, *args, af_lr: float = 0.1, af_betas: tuple[float, float] = (0.99, 0.999), **kwargs):
        if af_lr < 0:
            raise ValueError(f"af_lr={af_lr}: AfTrainer uses Adam for activations; use `afgpt train` for SGD")
        self.af_lr, self.af_betas = af_lr, af_betas
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            if self.af_lr == 0:
                model.base_model.activations.requires_grad_(False)
            weights, activations = split_parameters(model)
            groups = [{"params": weights, "lr": self.args.learning_rate, "weight_decay": self.args.weight_decay,
                       "betas": (self.args.adam_beta1, self.args.adam_beta2)}]
            if activations:
                groups.append({"params": activations, "lr": self.af_lr, "weight_decay": 0.0, "betas": self.af_betas})
            self.optimizer = torch.optim.AdamW(groups, eps=self.args.adam_epsilon)
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

