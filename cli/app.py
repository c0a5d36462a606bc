"""The ``onnx-linf`` typer application: one module per command, registered here."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from onnx_linf import __version__

from .clamp import clamp_command
from .console import console, setup_logging
from .evaluate import evaluate_command
from .exit_codes import EPILOG
from .inspect import inspect_command
from .prune import prune_command
from .scan import scan_command
from .sweep import sweep_command
from .synthesize import synthesize_command

app = typer.Typer(
    name="onnx-linf",
    help="Find and remove backdoors in ONNX image classifiers through ℓ∞ activation statistics.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        console.print(f"onnx-linf {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug).")] = 0,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """Find and remove backdoors in ONNX image classifiers through ℓ∞ activation statistics."""
    setup_logging(verbose)


app.command("scan", epilog=EPILOG)(scan_command)
app.command("inspect", epilog=EPILOG)(inspect_command)
app.command("prune", epilog=EPILOG)(prune_command)
app.command("clamp", epilog=EPILOG)(clamp_command)
app.command("evaluate", epilog=EPILOG)(evaluate_command)
app.command("sweep", epilog=EPILOG)(sweep_command)
app.command("synthesize", epilog=EPILOG)(synthesize_command)


def main() -> None:
    """Console-script entry point."""
    app()
