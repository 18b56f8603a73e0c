"""Atomic writes: build beside the target, then rename into place, so a reader (or a crash) sees the
old file or directory or the complete new one, never half of one."""
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` a temp file beside `path`, then rename it into place; the temp file never outlives a failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # not mkstemp: it makes 0600 files
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def restore_interrupted(target: Path, old: Path) -> None:
    """A crash between replace_directory's two renames leaves the previous directory only at `old`: put it back."""
    if old.exists() and not target.exists():
        os.replace(old, target)


def replace_directory(new: Path, target: Path, old: Path) -> None:
    """Put the finished directory `new` at `target`; the previous one waits at `old` until the new one is in place."""
    restore_interrupted(target, old)  # before clearing `old`, which may hold the only complete copy
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
