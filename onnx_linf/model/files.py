"""Atomic output files: a crash or a failed check never leaves a partial or clobbered file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx

from ..errors import UsageError


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



def save_model(proto, path: str | os.PathLike, *, external_data: bool = False) -> None:
    """Write an ONNX model atomically; with `external_data`, weights go to ``<name>.data`` beside it.

    Both files are written under temporary names in the destination folder and renamed into place
    only when complete (weights first, so the model never points at a half-written file).
    """

    path = Path(path)
    if not external_data:
        atomic_write(path, lambda p: onnx.save_model(proto, str(p)))
        return
    folder = path.parent if str(path.parent) else Path(".")
    data_name = f"{path.name}.data"
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=folder) as tmp:
        tmp_model = Path(tmp) / path.name
        onnx.save_model(proto, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        if (Path(tmp) / data_name).exists():
            os.replace(Path(tmp) / data_name, folder / data_name)
        os.replace(tmp_model, path)
