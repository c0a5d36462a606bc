"""``onnx-linf scan FOLDER``: one row per model of a folder or Triton repository, the worst exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from onnx_linf.commands.evidence import Evidence
from onnx_linf.commands.scan_many import scan_many
from onnx_linf.commands.settings import KEYS, Settings
from onnx_linf.measure.engine import EngineOptions
from onnx_linf.report.many import ModelOutcome, ScanManyReport

from .console import BarProgress, console, write_json
from .outputs import write_html, write_sarif, write_summary

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="Settings file (TOML): onnx-linf.toml keys or "
                                                   "pyproject.toml [tool.onnx-linf] (default: found upward from "
                                                   "the working directory).", metavar="FILE")]

_STYLE = {"clean": "green", "suspected": "bold red", "unscannable": "bold red", "allowlist-expired": "bold red",
          "allowlisted": "yellow", "not-assessed": "dim"}


def given_settings(ctx: typer.Context, params: dict) -> tuple[dict, dict]:
    """(settings given on the command line, the command's defaults for the others)."""
    cli, defaults = {}, {}
    for key in KEYS:
        if key not in params:
            continue
        # By name: typer's context may carry its own copy of click's ParameterSource enum.
        source = getattr(ctx.get_parameter_source(key), "name", None)
        given = source not in (None, "DEFAULT", "DEFAULT_MAP")
        (cli if given else defaults)[key] = params[key]
    return cli, defaults


def outcome_row(m: ModelOutcome) -> list[str]:
    """Result, model, why."""
    style = _STYLE.get(m.outcome, "")
    label = "not scanned" if m.outcome == "unscannable" else m.outcome
    return [f"[{style}]{label}[/]" if style else label, m.path, m.reason]


def outcomes_table(report: ScanManyReport) -> Table:
    """One row per model."""
    table = Table(title=f"{len(report.models)} models in {report.root} ({report.layout})", title_justify="left")
    for col in ("result", "model", "why"):
        table.add_column(col, overflow="fold")
    for m in report.models:
        table.add_row(*outcome_row(m))
    return table


def scan_folder(root: Path | list[Path], calib: Path, settings: Settings, cli: dict, defaults: dict,
                evidence: Evidence | None, skip_unscannable: bool, json_out: str | None, sarif: Path | None,
                summary: Path | None, html_out: Path | None, quiet: bool, engine: EngineOptions | None = None) -> None:
    """Scan every model under `root`, write the requested files, print the table, exit with the worst code."""
    def started(m: ModelOutcome) -> None:
        if not quiet:
            console.print(f"[dim]{m.path}: {m.outcome}[/]")

    report = scan_many(root, calib, settings=settings, cli=cli, defaults=defaults, evidence=evidence,
                       skip_unscannable=skip_unscannable, progress=BarProgress(quiet), on_model=started,
                       engine=engine)
    write_json(json_out, report.to_json())
    write_sarif(sarif, report)
    write_summary(summary, report)
    write_html(html_out, report)
    if not quiet:
        console.print(outcomes_table(report))
        skipped = len(report.skipped)
        console.print(f"{len(report.scanned)} scanned, {skipped} could not be scanned"
                      + (" (--skip-unscannable: not failing the run)" if skipped and skip_unscannable else "")
                      + f"; exit code {report.exit_code}")
    raise typer.Exit(report.exit_code)
