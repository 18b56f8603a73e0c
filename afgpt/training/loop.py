"""The training loop on Accelerate: train() builds the models (AfGPT, GPT-Neo or RoBERTa: families.py, or what a
model factory makes), their optimizers and data, and runs lm-afs's schedules with resumable checkpoints, logs,
metrics and plots; the family's objective (objectives.py) turns each batch into a loss and an accuracy.

A run directory holds everything a paper needs: train_config.json, the tokenizer, the final model
(loadable with AutoModelForCausalLM, or AutoModelForMaskedLM for RoBERTa, .from_pretrained(run_dir) after
`import afgpt`), the learned activations, train.log, metrics.jsonl, plots/*.png, and checkpoint/ (the latest
resumable state).
"""
import contextlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .. import data as data_lib
from ..activation_set import find_activation_set
from ..bank import ActivationBank
from ..ensemble import Replica, ReplicaPlacement, build_replicas, schedule_offsets, start_steps
from ..hub import load_activations
from .config import TrainConfig, check_inputs_exist
from .families import build_model, check_family_inputs, describe_model, kan_parameters, parameter_counts
from .monitors import (ActivationMagnitudes, KANGridCoverage, MoAGates, Throughput, evaluate, save_plots,
                       warn_if_bf16_is_emulated)
from .objectives import ForwardCausalLM, Objective, accuracy_kind, build_objective
from .optimizers import activation_optimizer, set_learning_rate, weight_optimizer
from .rundata import RunData, load_data
from .rundir import MetricsWriter, prepare_run_directory, resumed_config, run_logging, save_bank, save_checkpoint

logger = logging.getLogger("afgpt")


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


def load_bank(cfg: TrainConfig) -> ActivationBank | None:
    """Stage II: the learned activations named by --af-file, checked against the requested model."""
    if not cfg.af_file:
        return None
    bank = load_activations(cfg.af_file, num_hidden_layers=cfg.num_hidden_layers, af_type=cfg.af_type,
                            af_layer_specific=cfg.af_layer_specific)
    mode = "frozen" if cfg.af_lr == 0 else f"fine-tuned with af_lr {cfg.af_lr}"
    logger.info(f"loaded activations from {cfg.af_file} ({bank.settings.af_type}, {mode})")
    return bank


def placement_of(accelerator: Accelerator, n_models: int) -> ReplicaPlacement:
    """Stage I replicas spread over the processes; one model per process is data parallel (DDP) instead."""
    if n_models > 1:
        return ReplicaPlacement(accelerator.process_index, accelerator.num_processes)
    return ReplicaPlacement()


def build_replica_set(cfg: TrainConfig, run_data: RunData, accelerator: Accelerator,
                      model_factory: Callable[[int], torch.nn.Module] | None = None,
                      objective: Objective | None = None) -> tuple[list[Replica], torch.optim.Optimizer | None]:
    """The run's models (one, or stage I replicas sharing their activations) with optimizers and data.

    Replica m draws its weights under seed + m and reads data stream m (as the objective serves it: masked for
    RoBERTa); with one model this is plain training. `model_factory(m)` makes replica m's model (default: the
    model of cfg.model's family that `cfg` describes, build_model). Everything is passed through `accelerator.prepare`:
    one model is wrapped for data parallelism across processes; stage I replicas never are (every process holds all
    of them and trains its share, see ReplicaPlacement), and every process reads each replica's whole data stream.
    """
    bank = load_bank(cfg)

    def make_model(m: int) -> torch.nn.Module:
        set_seed(cfg.seed + m)
        return build_model(cfg, run_data, bank) if model_factory is None else model_factory(m)

    models = build_replicas(make_model, cfg.n_models, cfg.same_init_across_models)
    if bank is not None:
        bank.load_into(models[0], freeze=cfg.af_lr == 0)  # replica 0's activations are everyone's
    af_optimizer = activation_optimizer(find_activation_set(models[0]), cfg)
    optimizers = [weight_optimizer(model, cfg) for model in models]
    placement = placement_of(accelerator, cfg.n_models)
    # stage I replicas are placed on the device but never wrapped in DistributedDataParallel
    models = [accelerator.prepare_model(model, evaluation_mode=cfg.n_models > 1) for model in models]
    optimizers = [accelerator.prepare_optimizer(optimizer) for optimizer in optimizers]
    af_optimizer = accelerator.prepare_optimizer(af_optimizer) if af_optimizer else None

    objective = objective or ForwardCausalLM()
    shards = {} if cfg.n_models > 1 else {"rank": accelerator.process_index, "world_size": accelerator.num_processes}
    streams = [objective.train_batches(data_lib.TokenBatches(
                   run_data.train, cfg.per_device_train_batch_size, cfg.seq_length, seed=cfg.seed, stream=m, **shards))
               for m in range(1 if cfg.same_data_across_models else cfg.n_models)]
    starts = start_steps(cfg.n_models, cfg.max_steps, cfg.staggered_starts)
    offsets = schedule_offsets(starts, cfg.staggered_starts)
    replicas = [Replica(m, models[m], optimizers[m], streams[m % len(streams)], starts[m], offsets[m],
                        owned=placement.owns(m)) for m in range(cfg.n_models)]
    return replicas, af_optimizer


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
          model_factory: Callable[[int], torch.nn.Module] | None = None) -> dict:
    """Train the model `cfg` describes (AfGPT, GPT-Neo or RoBERTa: cfg.model); returns the final metrics.
    Multi-process under `accelerate launch`.

    `model_factory(m)`, if given, makes replica m's model instead of the one cfg's model fields describe; it is
    called after seeding with cfg.seed + m, and its models are trained with cfg.model's objective (afgpt: the
    model's forward with shift_labels; gpt-neo: trunk + fused LM head; roberta: masked LM), evaluated and saved
    like AfGPT (afgpt.find_activation_set finds their activations: AfGPT, or a patched model).

    With n_models > 1 this is stage I of activation discovery: replicas sharing one set of activations;
    evaluation, plots and saved files use replica 0, as in lm-afs. `resume` continues the run in
    cfg.output_dir (see TrainConfig for what may change); a finished run is left as it is.
    """
    check_inputs_exist(cfg)
    check_family_inputs(cfg)
    AcceleratorState._reset_state()  # a singleton: without this, a second run inherits the first's precision
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    is_main = accelerator.is_main_process
    out = prepare_run_directory(cfg, resume, overwrite) if is_main else Path(cfg.output_dir)
    accelerator.wait_for_everyone()
    if resume:
        cfg = resumed_config(cfg, TrainConfig.load(out / "train_config.json"))
    with run_logging(Path(cfg.log_file) if cfg.log_file else out / "train.log", is_main):
        return run(cfg, resume, accelerator, out, model_factory)


def run(cfg: TrainConfig, resume: bool, accelerator: Accelerator, out: Path,
        model_factory: Callable[[int], torch.nn.Module] | None) -> dict:
    """train() in its run directory, with its logging set up."""
    is_main = accelerator.is_main_process
    if is_main and not resume:
        cfg.save(out / "train_config.json")
    logger.info(f"afgpt train: {accelerator.num_processes} process(es), device {accelerator.device}, "
                f"mixed precision {cfg.mixed_precision}, output {out}")
    warn_if_bf16_is_emulated(cfg.mixed_precision, accelerator.device)

    set_seed(cfg.seed)
    run_data = load_data(cfg, out, is_main, accelerator.wait_for_everyone)
    objective = build_objective(cfg.model, run_data.tokenizer)
    replicas, af_optimizer = build_replica_set(cfg, run_data, accelerator, model_factory, objective)
    state = RunState()
    streams = list({id(r.batches): r.batches for r in replicas}.values())
    accelerator.register_for_checkpointing(*streams, state)
    model = accelerator.unwrap_model(replicas[0].model)
    logger.info(f"{describe_model(model, cfg)}, vocab {run_data.vocab_size}, {len(run_data.train):,} training tokens")
    if cfg.ffn_type == "kan":
        logger.info(f"KAN feed-forwards: {kan_parameters(model):,} parameters in {cfg.num_hidden_layers} layers "
                    f"(kan_width {cfg.kan_width}, grid {cfg.kan_grid_size}, order {cfg.kan_spline_order})")
    if objective.name == "masked":
        logger.info(f"objective: masked LM, {objective.collator.mlm_probability:.0%} of the tokens scored "
                    "(80% <mask>, 10% random, 10% kept); accuracy is masked-token accuracy")
    placement = placement_of(accelerator, cfg.n_models)
    if cfg.n_models > 1:
        spread = (f", spread over {placement.world_size} processes (replica m on rank m % {placement.world_size})"
                  if placement.distributed else "")
        logger.info(f"stage I: {cfg.n_models} replicas sharing their activations, start steps "
                    f"{[r.start for r in replicas]}, staggered_starts {cfg.staggered_starts}{spread}")
    if resume:
        accelerator.load_state(str(out / "checkpoint"))
        logger.info(f"resumed from {out / 'checkpoint'} at step {state.step}")
        if state.step >= cfg.max_steps:
            return finished_run(cfg, state, accelerator, out)
        if is_main:  # what this run now does: a longer max_steps, other cadences
            cfg.save(out / "train_config.json")
    metrics = MetricsWriter(out / "metrics.jsonl", state.history, is_main)
    if resume:
        metrics.rewrite()
    else:
        total, embedding = parameter_counts(model)
        metrics.write({"kind": "model", "params_total": total, "params_embedding": embedding,
                       "params_non_embedding": total - embedding})

    provenance = {"run": cfg.run_name or str(out), "model": cfg.model, "af_type": cfg.af_type, "sharing": cfg.af_layer_specific,
                  "n_models": cfg.n_models, "staggered_starts": cfg.staggered_starts, "data": cfg.data,
                  "seed": cfg.seed, "af_lr": cfg.af_lr, "af_file": cfg.af_file}
    tokens_per_step = cfg.per_device_train_batch_size * cfg.seq_length * cfg.gradient_accumulation_steps
    if not placement.distributed:  # data parallel: every process trains the model on its own batches
        tokens_per_step *= accelerator.num_processes
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not is_main, desc="training", unit="step")
    window = Throughput()
    for replica in replicas:
        replica.model.train()
    while state.step < cfg.max_steps:
        step = state.step
        results = train_step(replicas, af_optimizer, step, accelerator, cfg, objective)
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
            if (state.step % cfg.eval_steps == 0 or last) and (is_main or not placement.distributed):
                validate(model, run_data.val, cfg, metrics, state.step, objective)  # stage I: replica 0, rank 0's
                if is_main:
                    save_plots(model, state.history, out / "plots", cfg)
            if cfg.save_af_steps and state.step % cfg.save_af_steps == 0 and not last and is_main:
                snapshot = out / "activation_snapshots" / f"step-{state.step:06d}"
                save_bank(model, snapshot, {**provenance, "steps": state.step})
            if state.step % cfg.save_steps == 0 and not last:
                placement.sync(replicas)
                save_checkpoint(accelerator, out)
    bar.close()
    placement.sync(replicas)
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
                      "accuracy_kind": accuracy_kind(cfg.model), "lr": replica.optimizer.param_groups[0]["lr"],
                      "tokens_per_second": speed}
            records.append(record if cfg.n_models == 1 else {**record, "replica": replica.index})
    return records


def train_step(replicas: list[Replica], af_optimizer: torch.optim.Optimizer | None, step: int,
               accelerator: Accelerator, cfg: TrainConfig, objective: Objective | None = None
               ) -> dict[int, tuple[float, float]]:
    """One optimizer step of every replica active at `step`; returns {replica: (loss, accuracy)} of all of them
    (on every process). `objective` (default: the model's forward with shift_labels) gives each micro-batch's loss
    and accuracy.

    Each replica accumulates its gradients over `gradient_accumulation_steps` micro-batches; the shared
    activations' gradients are averaged over the active replicas (of all processes: ReplicaPlacement). Nothing is
    updated if a loss is not finite.
    """
    placement = placement_of(accelerator, len(replicas))
    active = [r for r in replicas if r.is_active(step)]
    fetched: dict[int, list] = {}  # replicas sharing a data stream see the same micro-batches
    for replica in active:  # every process advances every stream, so each holds the one-process data position
        if id(replica.batches) not in fetched:
            fetched[id(replica.batches)] = [next(replica.batches) for _ in range(cfg.gradient_accumulation_steps)]
    mine = [r for r in active if r.owned]
    results = {r.index: forward_backward(r.model, fetched[id(r.batches)], accelerator, objective,
                                         data_parallel=not placement.distributed) for r in mine}
    results = placement.gather_results(results, len(replicas), accelerator.device)
    shared = [p for g in af_optimizer.param_groups for p in g["params"]] if af_optimizer is not None else []
    if all(math.isfinite(loss) for loss, _ in results.values()):
        placement.reduce_shared_gradients(shared, len(active))
        if cfg.max_grad_norm > 0:
            clip_gradients(mine, shared, cfg.max_grad_norm, placement, accelerator.device)
        for replica in mine:
            set_learning_rate(replica.optimizer, cfg.learning_rate * cfg.lr_factor(step - replica.schedule_offset))
            replica.optimizer.step()
        if af_optimizer is not None:
            set_learning_rate(af_optimizer, abs(cfg.af_lr) * cfg.lr_factor(step))
            af_optimizer.step()
    for optimizer in [r.optimizer for r in mine] + ([af_optimizer] if af_optimizer else []):
        optimizer.zero_grad(set_to_none=True)
    return results


def clip_gradients(replicas: list[Replica], shared: list[torch.nn.Parameter], max_norm: float,
                   placement: ReplicaPlacement, device: torch.device) -> None:
    """Scale all gradients of the step (every active replica's own, on whichever process, and the shared ones) by
    max_norm / their total norm when it is larger, as one process clips the union of the parameters."""
    shared_ids = {id(p) for p in shared}
    own = {id(p): p for r in replicas for p in r.model.parameters() if p.grad is not None and id(p) not in shared_ids}
    with_grad = [p for p in shared if p.grad is not None]
    norm = placement.total_norm([p.grad for p in own.values()], [p.grad for p in with_grad], device)
    torch.nn.utils.clip_grads_with_norm_([*own.values(), *with_grad], max_norm, norm)


def forward_backward(model: torch.nn.Module, micro_batches: list, accelerator: Accelerator,
                     objective: Objective | None = None, data_parallel: bool = True) -> tuple[float, float]:
    """Accumulate one model's gradients over micro-batches; mean loss and accuracy. Data parallel over several
    processes (one model per process), DDP syncs on the last micro-batch, or, for an objective that does not call
    the model's forward, this averages the gradients across processes at the end, and the loss is the mean over the
    processes; a stage I replica (data_parallel=False) is this process's alone."""
    objective = objective or ForwardCausalLM()
    data_parallel = data_parallel and accelerator.num_processes > 1
    sync_here = data_parallel and not objective.calls_forward
    total_loss = torch.zeros((), device=accelerator.device)
    total_acc = torch.zeros((), device=accelerator.device)
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        input_ids, labels = (t.to(accelerator.device) for t in batch)
        with contextlib.nullcontext() if i == n - 1 and not sync_here else accelerator.no_sync(model):
            with accelerator.autocast():
                loss, accuracy = objective(model, input_ids, labels)
            accelerator.backward(loss / n)
        total_loss += loss.detach()
        total_acc += accuracy
    if sync_here:
        average_gradients_across_processes(model, accelerator.num_processes)
    if data_parallel:
        total_loss, total_acc = accelerator.reduce(total_loss, "mean"), accelerator.reduce(total_acc, "mean")
    return total_loss.item() / n, total_acc.item() / n


def average_gradients_across_processes(model: torch.nn.Module, world_size: int) -> None:
    """What DistributedDataParallel does after a backward through its forward: every gradient becomes the mean over
    the processes (all of them hold the same parameters, so the same gradients exist everywhere)."""
    for p in model.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world_size)


def validate(model, val_tokens, cfg: TrainConfig, metrics: MetricsWriter, step: int,
             objective: Objective | None = None) -> tuple[float, float]:
    """Validation loss/accuracy on fixed batches (fixed masks for RoBERTa), plus the activation magnitudes seen."""
    objective = objective or ForwardCausalLM()
    monitor, coverage, gates = ActivationMagnitudes(model), KANGridCoverage(model), MoAGates(model)
    try:
        batches = objective.val_batches(data_lib.val_batches(val_tokens, cfg.per_device_train_batch_size,
                                                             cfg.seq_length))
        loss, accuracy = evaluate(model, batches, cfg.eval_batches, objective)
    finally:
        monitor.close()
        coverage.close()
        gates.close()
    record = {"kind": "val", "step": step, "loss": loss, "accuracy": accuracy,
              "accuracy_kind": accuracy_kind(cfg.model)}
    metrics.write(record if cfg.n_models == 1 else {**record, "replica": 0}, *monitor.records(step),
                  *coverage.records(step), *gates.records(step))
    coverage.report(step)
    logger.info(f"Step {step}/{cfg.max_steps}   lossVa {loss:.4f}   accVa {100 * accuracy:.1f}")
    return loss, accuracy


def save_final(model: torch.nn.Module, run_data: RunData, out: Path, provenance: dict) -> None:
    """The final model and tokenizer (loadable with from_pretrained(out)) and the learned activations."""
    model.save_pretrained(out)
    if run_data.tokenizer is not None:
        run_data.tokenizer.save_pretrained(out)
    save_bank(model, out / "activations", provenance)


def final_metrics(history: list[dict], step: int, num_processes: int) -> dict:
    """What train() returns: the last training loss and validation loss/accuracy of replica 0."""
    def last(kind: str) -> dict:
        return next((r for r in reversed(history) if r["kind"] == kind and r.get("replica", 0) == 0), {})

    return {"step": step, "train_loss": last("train").get("loss"), "val_loss": last("val").get("loss"),
            "val_accuracy": last("val").get("accuracy"), "num_processes": num_processes}

