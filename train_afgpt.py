"""lm-afs-compatible front end: `python train_afgpt.py --flag value ...` with lm-afs's trainLmAf.py flags.

Maps lm-afs's camelCase flags onto afgpt.training.TrainConfig, trains with afgpt.training.train() (stage I
with --nModels > 1, stage II with --afFileToLoad), and writes lm-afs's learned-activation files
(dirResults/ptAf-RUN-stepNNNN.csv and .pt) at every --saveAfEvery step and at the end.
"""
import argparse
import dataclasses
from datetime import datetime
from pathlib import Path

from afgpt.activations import is_learnable, parse_af_spec
from afgpt.bank import LMAFS_SPLINES, read_activations
from afgpt.training import TrainConfig, train

LM_AFS_DOC_SEPARATOR = 50256  # GPT-2's <|endoftext|>, the separator afgpt uses for .bin shards
IGNORED_FLAGS = ("plotMinAcc", "plotMaxAcc", "plotMinLoss", "plotMaxLoss", "flexBlockSize")  # no afgpt equivalent


@dataclasses.dataclass
class LmAfsFlags:
    """lm-afs's trainLmAf.py flags and their defaults."""

    runName: str = ""
    seed: int = 0
    plotMinAcc: float | None = None
    plotMaxAcc: float | None = None
    plotMinLoss: float | None = None
    plotMaxLoss: float | None = None
    shuffleTrData: int = 1
    tokenDocSep: int = 50256
    nLayers: int = 4
    nHeads: int = 4
    dimEmb: int = 256
    tieEmbeddings: bool = True
    lr: float = 0.0006
    freezeEmbeddings: int = 0
    batchSize: int = 1
    seqLength: int = 4096
    contextSize: int = 1024
    nSteps: int = 20000
    nStepsWarmup: int = 2000
    nStepsCooldown: int = 10000
    lrSchedule: str = "trap"
    wtDecay: float = 0.0
    nModels: int = 1
    staggeredStarts: int = 2
    sameDataAcrossModels: bool = False
    sameInitAcrossModels: bool = False
    adamB1: float = 0.8
    adamB2: float = 0.95
    gradientClipping: float = 0
    afType: str = "gelu;att-linear"
    afLayerSpecific: int = 1
    afRange: float = 15
    afNAnchors: int = 64
    afInit: float = 0.01
    afLr: float = 0.1
    afAdamB1: float = 0.99
    afAdamB2: float = 0.999
    afFileToLoad: str = ""
    dirResults: str = "./results-fineweb10B"
    filesTokensTr: str = "./data-fineweb10B/fineweb_train_*.bin"
    filesTokensVa: str = "./data-fineweb10B/fineweb_val_*.bin"
    nTokensVa: int = 10485760
    valEvery: int = 500
    saveModelEvery: int = -1
    saveAfEvery: int = 0
    plotEvery: int = 200
    plottingLevel: int = 2
    dtype: str = "float32"
    flexBlockSize: int = 32


def parse_bool(text: str) -> bool:
    """lm-afs booleans: 1/0/true/false (any case)."""
    value = text.strip().lower()
    if value in ("1", "true"):
        return True
    if value in ("0", "false"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0/true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train AfGPT with lm-afs's trainLmAf.py flags.",
                                     allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(LmAfsFlags):
        kind = {bool: parse_bool, float | None: float}.get(field.type, field.type)
        parser.add_argument(f"--{field.name}", type=kind, default=field.default)
    return parser


def learnable_parts(af_type: str) -> tuple[bool, bool]:
    """Whether the MLP and attention activations of an af type have learnable parameters (the zoo's own notion)."""
    spec = parse_af_spec(af_type)
    return is_learnable(spec.mlp), is_learnable(spec.att)


def splines_only(af_type: str) -> bool:
    """Whether every learnable activation of an af type is a spline, the only kind lm-afs's ptAf files hold."""
    spec = parse_af_spec(af_type)
    return all(kind in LMAFS_SPLINES for kind in (spec.mlp, spec.att) if is_learnable(kind))


def check_supported(flags: LmAfsFlags) -> None:
    """Raise ValueError naming the first flag whose lm-afs feature afgpt does not have yet, and what to use instead."""
    unsupported = {
        "freezeEmbeddings": (flags.freezeEmbeddings != 0, "drop the flag (embeddings always train)"),
        "shuffleTrData": (flags.shuffleTrData != 1, "drop the flag or use --shuffleTrData 1 (shuffled windows)"),
        "tieEmbeddings": (not flags.tieEmbeddings, "drop the flag (AfGPT ties its input and output embeddings)"),
        "tokenDocSep": (flags.tokenDocSep not in (-1, LM_AFS_DOC_SEPARATOR),
                        f"use {LM_AFS_DOC_SEPARATOR} (GPT-2's <|endoftext|>) or -1 (no document masking); shards "
                        "made by `afgpt prepare` carry their own separator"),
    }
    for name, (bad, fix) in unsupported.items():
        if bad:
            raise ValueError(f"--{name} {getattr(flags, name)!r} is not yet supported by train_afgpt.py: {fix}")


def to_train_config(flags: LmAfsFlags) -> TrainConfig:
    """The TrainConfig equivalent of lm-afs flags (after normalize())."""
    precision = {"float32": "no", "bfloat16": "bf16"}.get(flags.dtype)
    if precision is None:
        raise ValueError(f"--dtype {flags.dtype!r}: use float32 or bfloat16")
    return TrainConfig(
        output_dir=str(Path(flags.dirResults) / flags.runName),
        log_file=str(Path(flags.dirResults) / f"log-{flags.runName}.txt"),
        run_name=flags.runName,
        data=flags.filesTokensTr,
        val_data=flags.filesTokensVa,
        val_tokens=flags.nTokensVa,
        eval_batches=max(1, flags.nTokensVa // flags.seqLength),
        hidden_size=flags.dimEmb,
        num_hidden_layers=flags.nLayers,
        num_attention_heads=flags.nHeads,
        af_type=flags.afType,
        af_layer_specific=flags.afLayerSpecific,
        af_range=flags.afRange,
        af_n_anchors=flags.afNAnchors,
        af_init=flags.afInit,
        context_size=flags.contextSize if flags.contextSize < flags.seqLength else None,
        doc_masking=flags.tokenDocSep != -1,
        max_steps=flags.nSteps,
        per_device_train_batch_size=1,
        seq_length=flags.seqLength,
        gradient_accumulation_steps=flags.batchSize,
        learning_rate=flags.lr,
        adam_beta1=flags.adamB1,
        adam_beta2=flags.adamB2,
        weight_decay=flags.wtDecay,
        lr_scheduler_type="cos" if flags.lrSchedule == "cosine" else flags.lrSchedule,
        warmup_steps=flags.nStepsWarmup,
        cooldown_steps=flags.nStepsCooldown,
        max_grad_norm=flags.gradientClipping,
        af_lr=flags.afLr,
        af_adam_beta1=flags.afAdamB1,
        af_adam_beta2=flags.afAdamB2,
        af_file=flags.afFileToLoad or None,
        n_models=flags.nModels,
        staggered_starts=flags.staggeredStarts,
        same_data_across_models=flags.sameDataAcrossModels,
        same_init_across_models=flags.sameInitAcrossModels,
        mixed_precision=precision,
        seed=flags.seed,
        logging_steps=flags.plotEvery if flags.plotEvery > 0 else 100,
        eval_steps=flags.valEvery if flags.valEvery > 0 else flags.nSteps,
        save_steps=flags.saveModelEvery if flags.saveModelEvery > 0 else flags.nSteps,
        save_af_steps=max(flags.saveAfEvery, 0),
        plotting_level=min(flags.plottingLevel, 2),
    )


def normalize(flags: LmAfsFlags) -> LmAfsFlags:
    """Apply lm-afs's defaulting rules: run name, MLP-only af types, frozen activations when none is learnable;
    and say which flags afgpt accepts but ignores."""
    if not flags.runName:
        flags = dataclasses.replace(flags, runName=f"{datetime.now():%y%m%d%H%M}")
    if ";" not in flags.afType:
        print(f"note: --afType {flags.afType!r} has no attention part; using '{flags.afType};att-linear'")
        flags = dataclasses.replace(flags, afType=f"{flags.afType};att-linear")
    if not any(learnable_parts(flags.afType)):
        flags = dataclasses.replace(flags, afLr=0.0, afLayerSpecific=0)
    if flags.afLr == 0:  # frozen or fixed activations: lm-afs writes no activation files
        flags = dataclasses.replace(flags, saveAfEvery=-1)
    if flags.plottingLevel > 2:
        print(f"note: --plottingLevel {flags.plottingLevel}: weight magnitudes are not plotted; using level 2")
    defaults = LmAfsFlags()
    ignored = [f"--{name}" for name in IGNORED_FLAGS if getattr(flags, name) != getattr(defaults, name)]
    if ignored:
        print(f"note: {' '.join(ignored)} accepted, ignored: afgpt's plots choose their own axis limits and its "
              "attention has no flex block size")
    return flags


def write_activation_files(flags: LmAfsFlags) -> list[Path]:
    """lm-afs's ptAf-RUN-stepNNNN.csv and .pt in dirResults for every activation snapshot and the final ones."""
    run = Path(flags.dirResults) / flags.runName
    snapshots = {int(d.name.removeprefix("step-")): d for d in sorted((run / "activation_snapshots").glob("step-*"))}
    snapshots[flags.nSteps] = run / "activations"
    written = []
    for step, directory in sorted(snapshots.items()):
        bank = read_activations(directory)
        stem = Path(flags.dirResults) / f"ptAf-{flags.runName}-step{step:04d}"
        written += [bank.to_lmafs_csv(stem.with_suffix(".csv")),
                    bank.to_lmafs_pt(stem.with_suffix(".pt"), lmafs_config(flags))]
    return written


def lmafs_config(flags: LmAfsFlags) -> dict:
    """The run's flags for the .pt config; afType is left to the bank, which writes it in lm-afs's split form."""
    return {name: value for name, value in dataclasses.asdict(flags).items() if name != "afType"}


def main(argv: list[str] | None = None) -> None:
    """Parse lm-afs flags, train, and write the activation CSV."""
    parser = build_parser()
    flags = LmAfsFlags(**vars(parser.parse_args(argv)))
    try:
        check_supported(flags)
        flags = normalize(flags)
        train(to_train_config(flags))
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    if flags.saveAfEvery != -1 and not splines_only(flags.afType):
        print(f"note: --afType {flags.afType!r}: lm-afs's ptAf files hold only splines, so none are written; the "
              f"learned activations are in {Path(flags.dirResults) / flags.runName / 'activations'}")
    elif flags.saveAfEvery != -1:
        for path in write_activation_files(flags):
            print(f"Saving AF: {path}")


if __name__ == "__main__":
    main()
