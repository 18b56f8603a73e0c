"""TrainConfig: every setting of a training run (with its `afgpt train --help` text and checks), and
lm-afs's learning-rate schedules."""
import glob
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import data as data_lib
from ..activation_set import ActivationSettings
from ..activations import ACTIVATION_NAMES, parse_af_spec
from ..atomic import write_text_atomically
from ..configuration_afgpt import AfGPTConfig
from ..ensemble import start_steps
from ..ffn import FFN_TYPES, FFNSettings, check_ffn_activation
from ..hub import FILE_SUFFIXES as ACTIVATION_FILE_SUFFIXES
from ..paths import looks_like_path

LR_SCHEDULES = ("trap", "warmup", "cos")
COS_MIN_FACTOR = 5e-4
WARMUP_PERCENT, COOLDOWN_PERCENT = 10, 50  # of max_steps, for warmup/cooldown left unset (200 steps: 20 and 100)
POSITIVE_FIELDS = ("max_steps", "per_device_train_batch_size", "seq_length", "gradient_accumulation_steps",
                   "logging_steps", "eval_steps", "save_steps", "eval_batches", "val_tokens")
FAMILIES = ("afgpt", "gpt-neo", "roberta")  # --model; afgpt.training.families builds them
SIZES = {  # --size presets (the same shape for every family; non-embedding parameters: GPT-Neo, RoBERTa, AfGPT)
    "tiny": {"hidden_size": 128, "num_hidden_layers": 5, "num_attention_heads": 4},  # 0.99M, 1.01M, ~1M
    "small": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6},  # 10.6M, 10.8M, ~10.6M
}
RESUMABLE_FIELDS = ("max_steps", "logging_steps", "eval_steps", "save_steps", "save_af_steps", "plotting_level",
                    "log_file")


def option(default, help_text: str):
    """A TrainConfig field with its `afgpt train --help` text (transformers.TrainingArguments' convention)."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as train_config.json in the run directory.

    Defaults train a small AfGPT on the built-in corpus in a few minutes on two CPU cores. `model` picks the
    family: afgpt, gpt-neo (transformers' GPTNeoForCausalLM, causal LM) or roberta (RobertaForMaskedLM, masked LM),
    the latter two patched with the activation and feed-forward settings (afgpt.patch_model). `size` presets the
    shape for any family: tiny = hidden 128, 5 layers, 4 heads, MLP 512 (~1M non-embedding parameters: GPT-Neo
    0.99M, RoBERTa 1.01M); small = hidden 384, 6 layers, 6 heads, MLP 1536 (~10M: GPT-Neo 10.6M, RoBERTa 10.8M).
    Unset, the width/depth flags apply; set, they must be left at their defaults (or agree).
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
                                                          "there is no --tokenizer (for roberta it also holds "
                                                          "<s> <pad> </s> <unk> <mask>)")
    val_tokens: int = option(32768, "tokens of text data held out for validation")
    # model
    model: str = option("afgpt", "model family: afgpt (this package's GPT, causal LM), gpt-neo (transformers' "
                                 "GPTNeoForCausalLM, causal LM, eager attention) or roberta (RobertaForMaskedLM, "
                                 "masked LM: 15% of the tokens masked with the 80/10/10 rule, SDPA attention, "
                                 "no dropout); gpt-neo and roberta get the --af-type and --ffn-type settings "
                                 "through afgpt.patch_model")
    size: str | None = option(None, "model size preset, for every --model: tiny (hidden 128, 5 layers, 4 heads, MLP "
                                    "512: ~1M non-embedding parameters) or small (hidden 384, 6 layers, 6 heads, MLP "
                                    "1536: ~10M); default: --hidden-size, --num-hidden-layers, --num-attention-heads")
    model_name_or_path: str | None = option(None, "continue from a saved model of --model's family (folder or Hub "
                                                  "name) instead of a fresh model; the model flags below are then "
                                                  "unused (default: a fresh model)")
    hidden_size: int = option(128, "model width (unless --size)")
    num_hidden_layers: int = option(4, "number of transformer layers (unless --size)")
    num_attention_heads: int = option(4, "attention heads (unless --size); they must divide --hidden-size (afgpt: "
                                         "into an even head size)")
    intermediate_size: int | None = option(None, "MLP width (default: 4 x hidden size); glu and kan derive their "
                                                 "widths from it so their parameters match an MLP of this width")
    af_type: str = option("gelu;att-linear",
                          "activation spec '<mlp>;att-<att>', e.g. 'gelu;att-linear' (baseline) or "
                          "'spline;att-spline'; names: " + " ".join(ACTIVATION_NAMES) + ", and att-none")
    af_layer_specific: int = option(1, "0 one activation per slot shared by all layers, 1 one per layer, 2 first "
                                       "and last layers own theirs and the middle layers share one")
    af_range: float = option(15.0, "splines: anchors evenly spaced on [-af_range, af_range]")
    af_n_anchors: int = option(64, "splines: number of anchors")
    af_init: float = option(0.01, "splines: initial constant value, or -1 to start as the identity")
    ffn_type: str = option("mlp", "feed-forward: mlp (the family's MLP with the --af-type MLP activation), kan "
                                  "(a B-spline KAN whose base function is that activation) or glu (act(x W) * x V, "
                                  "width 2/3 of the MLP's so parameters match)")
    kan_grid_size: int = option(5, "kan: grid intervals of each B-spline")
    kan_spline_order: int = option(3, "kan: B-spline order (3: cubic)")
    kan_grid_range: tuple[float, float] = option((-1.0, 1.0), "kan: the splines' grid range LOW HIGH")
    kan_width: str = option("params", "kan: hidden width; params (the KAN has as many parameters as the MLP) or "
                                      "mlp (the MLP's width)")
    context_size: int | None = option(None, "afgpt: sliding attention window in tokens (default: full causal "
                                            "attention)")
    doc_masking: bool | None = option(None, "afgpt: keep attention inside documents, as lm-afs (default: on for "
                                            "afgpt; gpt-neo and roberta have no document masking)")
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
        self.kan_grid_range = tuple(float(v) for v in self.kan_grid_range)  # a list when read from JSON
        self._resolve_model()
        if self.model == "afgpt":
            self.model_config(vocab_size=1)  # AfGPTConfig checks the model fields, with its own messages
        else:
            check_family_settings(self)

    def _resolve_model(self) -> None:
        """The family, the size preset and the family-specific defaults (doc_masking)."""
        if self.model not in FAMILIES:
            raise ValueError(f"model={self.model!r} is not a model family afgpt trains: choose one of "
                             f"{', '.join(FAMILIES)}")
        if self.size is not None:
            if self.size not in SIZES:
                raise ValueError(f"size={self.size!r} is not a size preset: choose one of {', '.join(SIZES)}, or "
                                 "leave it unset and give --hidden-size, --num-hidden-layers, --num-attention-heads")
            for name, value in SIZES[self.size].items():
                given = getattr(self, name)
                if given not in (value, TrainConfig.__dataclass_fields__[name].default):
                    raise ValueError(f"{name}={given} conflicts with size={self.size!r}, which sets {name}={value}: "
                                     f"drop --{name.replace('_', '-')} or --size")
                setattr(self, name, value)
        if self.model != "afgpt":
            unsupported = {"doc_masking": self.doc_masking is True, "context_size": self.context_size is not None}
            for name, given in unsupported.items():
                if given:
                    raise ValueError(f"{name}={getattr(self, name)!r}: only --model afgpt has {name.replace('_', ' ')}"
                                     f" ({self.model} attends across documents and over the whole sequence); drop "
                                     f"--{name.replace('_', '-')}")
        if self.doc_masking is None:
            self.doc_masking = self.model == "afgpt"

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
            intermediate_size=self.intermediate_size, ffn_type=self.ffn_type, kan_grid_size=self.kan_grid_size, kan_spline_order=self.kan_spline_order,
            kan_grid_range=self.kan_grid_range, kan_width=self.kan_width, context_size=self.context_size, **kwargs)

    def lr_factor(self, step: int) -> float:
        """The schedule's multiplier at `step` (0 before a replica's schedule starts)."""
        return lr_factor(step, self.lr_scheduler_type, self.max_steps, self.warmup_steps, self.cooldown_steps)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        return cls(**json.loads(Path(path).read_text()))

    def save(self, path: str | os.PathLike) -> None:
        """train_config.json: what the run does, written atomically."""
        write_text_atomically(Path(path), json.dumps(asdict(self), indent=2))


def check_family_settings(cfg: TrainConfig) -> None:
    """The model fields of a GPT-Neo or RoBERTa run (AfGPTConfig checks AfGPT's), each failing with its fix."""
    shape = ("hidden_size", "num_hidden_layers", "num_attention_heads") + (("intermediate_size",) if
                                                                          cfg.intermediate_size is not None else ())
    for name in shape:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: it must be a positive integer")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size={cfg.hidden_size} is not divisible by num_attention_heads="
                         f"{cfg.num_attention_heads}: pick a head count that divides the width")
    if cfg.ffn_type not in FFN_TYPES:
        raise ValueError(f"ffn_type={cfg.ffn_type!r}: {cfg.model} takes {', '.join(FFN_TYPES)}")
    ActivationSettings(af_type=cfg.af_type, af_layer_specific=cfg.af_layer_specific, af_range=cfg.af_range,
                       af_n_anchors=cfg.af_n_anchors, af_init=cfg.af_init, num_hidden_layers=cfg.num_hidden_layers,
                       hidden_size=cfg.hidden_size)  # checks the activation fields
    FFNSettings(ffn_type=cfg.ffn_type, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                kan_grid_size=cfg.kan_grid_size, kan_spline_order=cfg.kan_spline_order,
                kan_grid_range=cfg.kan_grid_range, kan_width=cfg.kan_width)  # checks the feed-forward fields
    check_ffn_activation(cfg.ffn_type, parse_af_spec(cfg.af_type))


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

