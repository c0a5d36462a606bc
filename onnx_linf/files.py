"""Atomic output files: a crash or a failed check never leaves a partial or clobbered file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import UsageError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to `path`, then rename it into place.

    The temporary file lives in the destination folder so the final ``os.replace`` is atomic on
    the same file system; it is removed if `write` raises.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"output folder does not exist: {folder}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically."""
    atomic_write(path, lambda p: p.write_text(text))


def check_output_path(output: str | os.PathLike, inputs: list[str | os.PathLike], force: bool) -> Path:
    """Refuse to overwrite an input file, or any existing file without `force`.

    Raises:
        UsageError: the output is one of the inputs, or exists and `force` is False.
    """
    out = Path(output)
    for inp in inputs:
        if out.exists() and Path(inp).exists() and out.resolve() == Path(inp).resolve():
            raise UsageError(f"refusing to overwrite the input model {inp}; choose another -o path")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    return out
