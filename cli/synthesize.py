"""``onnx-linf synthesize``: query-only trigger synthesis per class and the Neural Cleanse verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from onnx_linf.commands.synthesize import synthesize_model
from onnx_linf.decide.synthesis.results import SynthConfig, SynthResult

from . import options as o
from .console import BarProgress, console, user_errors, write_json
from .exit_codes import ExitCode
from .outputs import HtmlOut, SummaryOut, check_html, check_targets, write_html, write_summary


def synthesize_command(
    model: o.ModelArg,
    calib: o.CalibOpt,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for class_<c>/trigger.png, "
                                                    "class_<c>/mask.png and summary.json.")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Candidate target classes, comma-separated "
                                                   "(default: all).")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps per class.")] = SynthConfig.steps,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same triggers.")] = 0,
    max_queries: Annotated[Optional[int], typer.Option(help="Most image forward passes in total.")] = None,
    time_limit: Annotated[Optional[float], typer.Option(help="Wall-clock limit in seconds, shared equally "
                                                        "by the classes; classes that would start after "
                                                        "it are skipped.")] = None,
    threshold: Annotated[float, typer.Option(help="Anomaly index above which a class with a small "
                                             "trigger is suspected.")] = SynthConfig.threshold,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images each candidate trigger is "
                                            "stamped on per optimiser step.")] = SynthConfig.batch,
    provider: o.Provider = "auto",
    limit: Annotated[Optional[int], typer.Option(help="Use at most N calibration images, spread evenly "
                                                 f"over the data (default {SynthConfig.images}).")] = None,
    size: o.Size = None,
    layout: o.Layout = None,
    channels: o.Channels = None,
    scale: o.Scale = None,
    mean: o.Mean = None,
    std: o.Std = None,
    json_out: o.JsonOut = None,
    summary: SummaryOut = None,
    html_out: HtmlOut = None,
    quiet: o.Quiet = False,
) -> None:
    """Search the smallest trigger that sends clean images to each class, with forward passes only.

    A backdoor target needs a far smaller trigger than the other classes: Neural Cleanse's anomaly
    index (median/MAD of the per-class log mask norms) above --threshold flags it. Each trigger's ℓ∞
    evidence on the last activation map is reported alongside.
    """
    with user_errors():
        check_targets(summary, html_out)
        check_html(html_out)
        config = SynthConfig(classes=o.parse_classes(classes), steps=steps, seed=seed, max_queries=max_queries,
                             time_limit=time_limit, threshold=threshold, batch=batch_size,
                             images=limit if limit is not None else SynthConfig.images)
        config.validate()
        done = synthesize_model(model, calib, config, out_dir=out_dir, provider=provider,
                                preprocess=o.preprocess_options(size, layout, channels, scale, mean, std),
                                progress=BarProgress(quiet))
        result = done.synthesis
        write_json(json_out, done.report.to_json())
        write_summary(summary, done.report)
        write_html(html_out, done.report)
    if not quiet:
        console.print(triggers_table(result))
        verdict_lines(result)
        if out_dir is not None:
            console.print(f"triggers written to [bold]{out_dir}[/]")
    raise typer.Exit(ExitCode.OK)


def triggers_table(result: SynthResult) -> Table:
    """Per class: mask L1, ASR, where the search started, ℓ∞ concentration, anomaly index."""
    table = Table(title=f"synthesized triggers ({len(result.triggers)} classes, {result.queries} queries, "
                        f"{result.seconds:.1f} s)", title_justify="left")
    for col in ("class", "mask L1", "ASR", "start", "ℓ∞ top share", "anomaly", ""):
        table.add_column(col, justify="right" if col not in ("start", "") else "left")
    for t in result.triggers:
        index = result.anomaly.get(t.target, 0.0)
        mark = "[bold red]suspected[/]" if t.target in result.suspected else ""
        if not t.found:
            mark = "[dim]not found[/]"
        share = "" if t.concentration is None else f"{t.concentration:.2f}"
        table.add_row(str(t.target), f"{t.mask_l1:.1f}", f"{t.asr:.2f}", t.start, share, f"{index:.2f}", mark)
    return table


def verdict_lines(result: SynthResult) -> None:
    """The verdict in one line, plus what was skipped."""
    if not result.complete:
        console.print("[yellow]the query budget or time limit cut the search short: not every class "
                      "was searched[/]")
    pre = result.preselection
    if pre is not None:
        skipped = sum(1 for r in result.not_examined.values() if r == "pre-selection")
        console.print(f"pre-selection: searched {len(pre.candidates)} candidate and {len(pre.references)} "
                      f"reference classes of {pre.num_classes}; {skipped} scored low and were not examined "
                      "(see --json: not_examined, preselection)")
    if result.suspected:
        worst = result.suspected[0]
        console.print(f"[bold]verdict[/] [bold red]suspected[/]: target class(es) "
                      f"{', '.join(map(str, result.suspected))} (anomaly index "
                      f"{result.anomaly[worst]:.2f} > {result.threshold:g})")
    else:
        console.print(f"[bold]verdict[/] no class stands out (largest anomaly index "
                      f"{max(result.anomaly.values(), default=0.0):.2f} <= {result.threshold:g})")
