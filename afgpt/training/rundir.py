"""The run directory: creating it, resuming it (checks against its train_config.json), train.log,
metrics.jsonl, atomic checkpoints and saved activations."""
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path

from accelerate import Accelerator

from ..atomic import replace_directory, restore_interrupted, write_text_atomically
from ..bank import ActivationBank
from ..modeling_afgpt import AfGPTForCausalLM
from .config import RESUMABLE_FIELDS, TrainConfig

logger = logging.getLogger("afgpt")


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


@contextmanager
def run_logging(log_file: Path, is_main: bool) -> Iterator[None]:
    """Log a run to the console and to its log file (main process only), then give the "afgpt" logger back as it
    was: a run in a notebook or a test leaves no handler, open file or silenced propagation behind."""
    saved = logger.level, logger.propagate, logger.handlers[:]
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers = [console]
    if is_main:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in logger.handlers:
            handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers = saved[2]


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


def save_bank(model: AfGPTForCausalLM, directory: Path, provenance: dict) -> None:
    """The model's learnable activations as a bank directory (with its model card and plot), if it has any."""
    bank = ActivationBank.from_model(model, provenance)
    if not bank.is_empty():
        bank.save(directory)

