"""Training the grid: every run (stage I runs first), skipping finished ones and resuming interrupted ones, one
after the other or `jobs` side by side; a failure is written to its run directory and the grid goes on. Each
finished model is then evaluated (BLiMP, SuperGLUE) if the grid asks for it, once. `plan` prints the same work as
`afgpt train` (and `afgpt eval-*`) commands for a scheduler instead.
"""
import contextlib
import json
import logging
import os
import shlex
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import write_text_atomically
from ..training.config import TrainConfig
from ..training.loop import train
from .grid import ERROR_FILE, EVAL_ERROR_FILE, CompareGrid, Variant, run_status, safe_metrics
from .results import collect

logger = logging.getLogger("afgpt.compare")


@dataclass(frozen=True)
class Job:
    """One training run of the grid: a variant's stage I (seed None) or the run of one seed."""

    variant: Variant
    seed: int | None

    @property
    def label(self) -> str:
        return f"{self.variant.slug}/{'stage1' if self.seed is None else f'seed{self.seed}'}"

    def fields(self, grid: CompareGrid) -> dict:
        return grid.stage1_fields(self.variant) if self.seed is None else grid.run_fields(self.variant, self.seed)


def jobs(grid: CompareGrid) -> list[list[Job]]:
    """The grid's runs in two waves: the stage I runs, then every run the table reports (stage II needs stage I)."""
    stage1 = [Job(variant, None) for variant in grid.variants if variant.stage2]
    return [wave for wave in (stage1, [Job(variant, seed) for variant, seed in grid.runs()]) if wave]


def execute(grid: CompareGrid, job: Job) -> str:
    """Train one run unless it is finished (resume it if interrupted), then evaluate it as the grid asks; a failure
    is written to the run directory and logged, not raised, so the other runs go on. Returns what happened:
    skipped, trained, resumed or failed (with ", evaluated" or ", evaluation failed" when evaluations ran)."""
    cfg = TrainConfig(**job.fields(grid))
    run_dir = Path(cfg.output_dir)
    status = run_status(run_dir, cfg.max_steps)
    if status == "done":
        logger.info(f"{job.label}: finished before, skipped")
        outcome = "skipped"
    else:
        outcome = train_run(grid, job, cfg, status)
    if outcome == "failed" or job.seed is None:
        return outcome
    evaluated = evaluate_run(grid, run_dir)
    return outcome + (f", {evaluated}" if evaluated else "")


def train_run(grid: CompareGrid, job: Job, cfg: TrainConfig, status: str) -> str:
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if job.variant.stage2 and job.seed is not None:
        stage1 = TrainConfig(**grid.stage1_fields(job.variant))
        if run_status(Path(stage1.output_dir), stage1.max_steps) != "done":
            return record_failure(run_dir, job, f"stage I did not finish (see {stage1.output_dir}), so there are no "
                                                "activations to load; rerun the comparison to retry it")
    logger.info(f"{job.label}: {'resuming' if status == 'partial' else 'training'} in {run_dir}")
    try:
        train(cfg, resume=status == "partial", overwrite=status == "new")
    except Exception as error:  # a diverged or broken run must not stop the grid
        logger.exception(f"{job.label} failed")
        return record_failure(run_dir, job, f"{type(error).__name__}: {error}")
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    return "resumed" if status == "partial" else "trained"


def record_failure(run_dir: Path, job: Job, message: str) -> str:
    write_text_atomically(run_dir / ERROR_FILE, message)
    logger.error(f"{job.label} failed: {message}")
    return "failed"


def evaluate_run(grid: CompareGrid, run_dir: Path) -> str:
    """The grid's evaluations of a finished run that lacks them, each on its own (one failing does not stop the
    other); each writes its records into the run's metrics.jsonl (afgpt.evaluation), which is how a rerun knows it
    is done. Returns "evaluated", "evaluation failed" or "" (nothing to do)."""
    kinds = {record["kind"] for record in safe_metrics(run_dir)}
    todo = [kind for kind in grid.evaluations if kind not in kinds]
    failures = []
    for kind in todo:
        logger.info(f"{run_dir}: {kind}")
        try:
            evaluate(kind, grid.evaluations[kind], run_dir)
        except Exception as error:  # the trained model stays; a rerun tries the evaluation again
            logger.exception(f"{run_dir}: {kind} failed")
            failures.append(f"{kind}: {type(error).__name__}: {error}")
    if failures:
        write_text_atomically(run_dir / EVAL_ERROR_FILE, "; ".join(failures))
        return "evaluation failed"
    (run_dir / EVAL_ERROR_FILE).unlink(missing_ok=True)
    return "evaluated" if todo else ""


def evaluate(kind: str, settings: dict, run_dir: Path) -> None:
    """One evaluation of a finished run, its records appended to the run's metrics.jsonl."""
    from ..evaluation.blimp import evaluate_models  # scoring and Trainer load only when a grid evaluates
    from ..evaluation.finetune import evaluate_superglue

    if kind == "blimp":
        evaluate_models([str(run_dir)], settings["data"], limit=settings["limit"], progress=False)
    else:
        evaluate_superglue(str(run_dir), settings["data"], run_dir / "superglue", settings["tasks"],
                           settings["preset"], progress=False)


def run_grid(grid: CompareGrid, jobs_at_once: int = 1) -> dict:
    """Train (and evaluate) every run of the grid, skipping finished ones, then collect the results from the run
    directories. With jobs_at_once > 1, that many runs train side by side in worker processes, each with its share
    of the threads. compare.log records what happened to each run."""
    grid.save()
    outcomes: dict[str, str] = {}
    with compare_logging(Path(grid.output_dir) / "compare.log"):
        bar = tqdm(total=sum(map(len, jobs(grid))), desc="compare", unit="run")
        for wave in jobs(grid):
            if jobs_at_once == 1:
                for job in wave:
                    bar.set_postfix_str(job.label)
                    outcomes[job.label] = execute(grid, job)
                    bar.update(1)
            else:
                outcomes.update(run_side_by_side(grid, wave, jobs_at_once, bar))
        bar.close()
        logger.info(f"runs: {json.dumps(outcomes)}")
    return collect(grid.output_dir)


def run_side_by_side(grid: CompareGrid, wave: list[Job], jobs_at_once: int, bar: tqdm) -> dict[str, str]:
    """A wave of jobs in `jobs_at_once` fresh worker processes (spawned: nothing shared with this one), each with
    its share of this process's threads and without progress bars of its own (the grid's bar is here)."""
    threads = max(1, torch.get_num_threads() // jobs_at_once)
    outcomes = {}
    with environment(OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1"), \
            ProcessPoolExecutor(jobs_at_once, mp_context=get_context("spawn")) as pool:
        futures = {job.label: pool.submit(execute, grid, job) for job in wave}  # the workers start here
        for label, future in futures.items():
            try:
                outcomes[label] = future.result()
            except BrokenProcessPool as error:  # a worker died (killed, out of memory): its run can be resumed
                logger.error(f"{label}: the worker process died ({error}); rerun the comparison to resume it")
                outcomes[label] = "worker died"
            bar.update(1)
    return outcomes


@contextlib.contextmanager
def environment(**variables: str) -> Iterator[None]:
    """Environment variables set while worker processes start (they read them at startup), then restored."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def compare_logging(path: Path) -> Iterator[None]:
    """compare.log in the output directory for the runner's own lines (each run keeps its train.log)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%Y-%m-%d %H:%M:%S"))
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


# ----------------------------------------------------------------------------- planning (SLURM arrays)

def train_command(cfg_fields: dict) -> list[str]:
    """`afgpt train` with one flag per given TrainConfig field."""
    parts = ["afgpt", "train"]
    for name, value in cfg_fields.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        elif value is not None:
            parts += [flag, str(value)]
    return parts


def eval_commands(grid: CompareGrid, run_dir: Path) -> list[list[str]]:
    """The `afgpt eval-*` commands the grid's evaluations run on a finished run."""
    commands = []
    if blimp := grid.evaluations.get("blimp"):
        limit = ["--limit", str(blimp["limit"])] if blimp.get("limit") else []
        commands.append(["afgpt", "eval-blimp", str(run_dir), "--data", blimp["data"], *limit])
    if superglue := grid.evaluations.get("superglue"):
        commands.append(["afgpt", "eval-superglue", str(run_dir), "--data", superglue["data"], "--tasks",
                         ",".join(superglue["tasks"]), "--preset", superglue["preset"]])
    return commands


def plan(grid: CompareGrid) -> list[str]:
    """One shell line per run (`afgpt train`, then the grid's evaluations, joined by &&): a SLURM array's lines.
    Two-stage variants' stage I lines go to commands_stage1.txt, which must finish before commands.txt starts;
    the rest to commands.txt. Afterwards `afgpt compare --collect` builds the table from the run directories."""
    grid.save()
    lines = []
    for wave in jobs(grid):
        wave_lines = []
        for job in wave:
            fields = job.fields(grid)
            commands = [train_command(fields)]
            if job.seed is not None:
                commands += eval_commands(grid, Path(fields["output_dir"]))
            wave_lines.append(" && ".join(map(shlex.join, commands)))
        name = "commands_stage1.txt" if wave[0].seed is None else "commands.txt"
        write_text_atomically(Path(grid.output_dir) / name, "\n".join(wave_lines) + "\n")
        lines += wave_lines
    print("\n".join(lines))
    return lines
