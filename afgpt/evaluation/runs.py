"""Evaluation results in the run they evaluate: appended to an `afgpt train` run's metrics.jsonl, so the comparison
runner and `afgpt push` (the model card's model-index) read them from where the run's other numbers are."""
import json
import os
from pathlib import Path

__all__ = ["append_to_run", "is_run_directory"]


def is_run_directory(path: str | os.PathLike) -> bool:
    """A folder `afgpt train` wrote (its train_config.json and metrics.jsonl), not just any model folder."""
    folder = Path(path)
    return (folder / "train_config.json").is_file() and (folder / "metrics.jsonl").is_file()


def append_to_run(path: str | os.PathLike, record: dict) -> bool:
    """Append `record` (a JSON object with a "kind") to the run's metrics.jsonl when `path` is a run directory;
    returns whether it did. One line written and flushed at once, as the training loop writes its records."""
    if not is_run_directory(path):
        return False
    with open(Path(path) / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return True
