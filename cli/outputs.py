"""Report files besides the JSON: Markdown summary (and the CI step summary), SARIF, HTML."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from onnx_linf.errors import UsageError
from onnx_linf.model.files import atomic_write_text
from onnx_linf.report.html import html_report
from onnx_linf.report.markdown import markdown_summary
from onnx_linf.report.plots import pyplot
from onnx_linf.report.sarif import sarif_json

from .console import console

#: GitHub Actions (and Forgejo/Gitea runners) append Markdown written to this file to the job's page.
STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"

SummaryOut = Annotated[Optional[Path], typer.Option("--summary", help="Write a Markdown summary (one row per "
                                                    "model, verdict first). Also appended to "
                                                    "$GITHUB_STEP_SUMMARY when that is set.", metavar="FILE")]
SarifOut = Annotated[Optional[Path], typer.Option("--sarif", help="Write a SARIF 2.1.0 log of the findings "
                                                  "(for code scanning).", metavar="FILE")]
HtmlOut = Annotated[Optional[Path], typer.Option("--report", help="Write a self-contained HTML report with "
                                                 "plots (needs matplotlib: pip install 'onnx-linf[report]').",
                                                 metavar="FILE.html")]


def check_targets(*paths: Path | None) -> None:
    """Fail before any work when an output folder does not exist."""
    for p in paths:
        if p is not None and not (p.parent if str(p.parent) else Path(".")).is_dir():
            raise UsageError(f"output folder does not exist: {p.parent}")


def write_summary(path: Path | None, report) -> None:
    """The Markdown summary to `path` (atomically) and appended to the CI step summary, if set."""
    step = os.environ.get(STEP_SUMMARY_ENV)
    if path is None and not step:
        return
    text = markdown_summary(report)
    if path is not None:
        atomic_write_text(path, text)
        console.print(f"summary written to [bold]{path}[/]")
    if step:
        try:
            with open(step, "a", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as exc:
            raise UsageError(f"cannot append to ${STEP_SUMMARY_ENV} ({step}): {exc.strerror}") from None


def write_sarif(path: Path | None, outcomes) -> None:
    """The SARIF log, paths relative to the working directory (the repository root in CI)."""
    if path is None:
        return
    atomic_write_text(path, sarif_json(outcomes) + "\n")
    console.print(f"SARIF written to [bold]{path}[/]")



def write_html(path: Path | None, report) -> None:
    """The self-contained HTML report."""
    if path is None:
        return
    atomic_write_text(path, html_report(report))
    console.print(f"HTML report written to [bold]{path}[/]")


def check_html(path: Path | None) -> None:
    """Fail before any work when --report is asked for without matplotlib."""
    if path is not None:
        pyplot()
