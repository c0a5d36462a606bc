"""Rich output for humans on stderr, errors as one line, progress bars only on a terminal."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from onnx_linf.errors import LinfError
from onnx_linf.measure.calibrate import Progress as LibraryProgress
from onnx_linf.model.files import atomic_write_text

#: Humans read stderr; stdout carries only what was asked for (``--json -``). Off a terminal (CI
#: logs) rich would wrap at 80 columns and cut tensor names; logs are read wide.
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
stdout = Console(highlight=False, soft_wrap=True)

LOG_ENV = "ONNX_LINF_LOG"


def setup_logging(verbose: int) -> None:
    """Level of the ``onnx_linf`` logger (not root) from ``-v`` and the ONNX_LINF_LOG variable."""
    level = os.environ.get(LOG_ENV, "").upper() or {0: "WARNING", 1: "INFO"}.get(verbose, "DEBUG")
    logger = logging.getLogger("onnx_linf")
    logger.setLevel(level)
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=console, show_path=False, show_time=False))
    logger.propagate = False


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors into one line on stderr and their exit code; bugs keep their traceback."""
    try:
        yield
    except LinfError as exc:
        # Messages are plain text: "pip install 'onnx-linf[report]'" must not be read as rich markup.
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        if exc.hint:
            console.print(f"[dim]hint: {escape(exc.hint)}[/]", soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


class BarProgress(LibraryProgress):
    """Library progress drawn as a rich bar; silent when stderr is not a terminal or with --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.enabled = not quiet and console.is_terminal
        self._progress: Progress | None = None
        self._task = None

    def start(self, task: str, total: int | None) -> None:
        if not self.enabled:
            return
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task(task, total=total)

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def write_json(target: str | None, text: str) -> None:
    """Write a JSON report to a file (atomically) or to stdout for ``-``."""
    if target is None:
        return
    if target == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    atomic_write_text(Path(target), text + "\n")
    console.print(f"report written to [bold]{target}[/]")
