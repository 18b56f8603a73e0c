"""Training afgpt's model families (AfGPT, GPT-Neo, RoBERTa): an Accelerate loop with lm-afs optimizers and
schedules, resumable checkpoints, logs, metrics and plots; and the glue to train AfGPT with transformers.Trainer.

config (TrainConfig, schedules) <- optimizers, rundir, rundata, objectives, monitors, families <- loop (train);
trainer (AfTrainer) uses optimizers. The names below are the package's API: `from afgpt.training import X` finds
each where it lives.
"""
import logging

from .config import (COOLDOWN_PERCENT, COS_MIN_FACTOR, FAMILIES, LR_SCHEDULES, POSITIVE_FIELDS, RESUMABLE_FIELDS,
                     SIZES, WARMUP_PERCENT, TrainConfig, check_inputs_exist, lr_factor, option)
from .families import (FAMILY, Family, build_model, check_family_inputs, describe_model, family_config,
                       parameter_counts)
from .loop import (RunState, TrainingDiverged, build_replica_set, final_metrics, finished_run, forward_backward,
                   load_bank, log_training, save_final, train, train_records, train_step, validate)
from .objectives import (FusedCausalLM, ForwardCausalLM, MaskedBatches, MaskedLM, Objective, accuracy_kind,
                         build_objective)
from .monitors import (ActivationMagnitudes, KANGridCoverage, MoAGates, Throughput, cpu_has_native_bf16, evaluate,
                       save_plots, warn_if_bf16_is_emulated)
from .optimizers import (activation_optimizer, decay_parameter_names, set_learning_rate, split_parameters,
                         weight_groups, weight_optimizer)
from .rundata import (GPT2_SEPARATOR, GPT2_VOCAB, RunData, check_recorded_tokenizer, load_data, load_shards,
                      padded_vocab, shard_record)
from .rundir import (MetricsWriter, prepare_run_directory, resumed_config, run_logging, save_bank,
                     save_checkpoint)
from .trainer import ActivationPlotCallback, AfTrainer

logger = logging.getLogger("afgpt")

__all__ = [
    "COOLDOWN_PERCENT", "COS_MIN_FACTOR", "FAMILIES", "LR_SCHEDULES", "POSITIVE_FIELDS", "RESUMABLE_FIELDS", "SIZES",
    "WARMUP_PERCENT", "TrainConfig", "check_inputs_exist", "lr_factor", "option", "FAMILY", "Family", "build_model",
    "check_family_inputs", "describe_model", "family_config", "parameter_counts", "RunState", "TrainingDiverged",
    "build_replica_set", "final_metrics", "finished_run", "forward_backward", "load_bank", "log_training",
    "save_final", "train", "train_records", "train_step", "validate", "FusedCausalLM", "ForwardCausalLM",
    "MaskedBatches", "MaskedLM", "Objective", "accuracy_kind", "build_objective", "ActivationMagnitudes",
    "KANGridCoverage", "MoAGates",
    "Throughput", "cpu_has_native_bf16", "evaluate", "save_plots", "warn_if_bf16_is_emulated",
    "activation_optimizer", "decay_parameter_names", "set_learning_rate", "split_parameters", "weight_groups",
    "weight_optimizer", "GPT2_SEPARATOR", "GPT2_VOCAB", "RunData", "check_recorded_tokenizer", "load_data",
    "load_shards", "padded_vocab", "shard_record", "MetricsWriter", "prepare_run_directory", "resumed_config",
    "save_bank", "save_checkpoint", "run_logging", "ActivationPlotCallback", "AfTrainer",
]
