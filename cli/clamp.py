"""``onnx-linf clamp``: bound every activation map to its clean range (trigger-free sanitising)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.table import Table

from onnx_linf.commands.clamp import ClampConfig, clamp
from onnx_linf.commands.common import MIN_AGREEMENT
from onnx_linf.errors import UsageError
from onnx_linf.measure.accuracy import before_after, open_labelled
from onnx_linf.measure.preprocess import Trigger
from onnx_linf.model.load import load_model
from onnx_linf.report.types import ClampReport

from . import options as o
from .console import BarProgress, console, user_errors, write_json
from .evaluate import evaluation_table
from .exit_codes import ExitCode
from .outputs import HtmlOut, SummaryOut, check_html, check_targets, write_html, write_summary
from .prune import EvalData, Output, Target
from .render import print_notes


def clamp_command(
    model: o.ModelArg,
    calib: o.CalibOpt,
    output: Output,
    layers: o.Layers = "all",
    granularity: Annotated[str, typer.Option(help="position (one bound per channel x H x W) or channel.")]
    = "position",
    quantile: Annotated[float, typer.Option(help="Bound = this percentile of clean values (100 = max: the "
                                            "clamp is then the identity on the calibration images).")] = 100.0,
    margin: Annotated[float, typer.Option(help="Widen each bound by margin * |bound| (headroom).")] = 0.0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file (never the input).")]
    = False,
    eval_data: EvalData = None,
    trigger: o.Trigger = None,
    mask: o.Mask = None,
    target: Target = None,
    min_agreement: o.MinAgreement = MIN_AGREEMENT,
    batch_size: o.BatchSize = 32,
    provider: o.Provider = "auto",
    ray: o.RayFlag = False,
    ray_workers: o.RayWorkers = None,
    ray_gpus: o.RayGpus = 0.0,
    limit: o.Limit = None,
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
    """Bound every conv activation map to the range clean calibration images produce there.

    Needs no trigger and no labels. A trigger that drives activations beyond anything clean images
    produce is cut; image-wide blended triggers that stay inside the clean range are the weak case.
    """
    with user_errors():
        check_targets(summary, html_out)
        check_html(html_out)
        if eval_data is not None and (trigger is None or target is None):
            raise UsageError("--eval-data needs --trigger/--mask and --target to measure the ASR")
        pp = o.preprocess_options(size, layout, channels, scale, mean, std)
        config = ClampConfig(layers=o.parse_layers(layers), granularity=granularity, quantile=quantile,
                             margin=margin, batch_size=batch_size, provider=provider, limit=limit, preprocess=pp,
                             min_agreement=min_agreement, engine=o.engine_options(ray, ray_workers, ray_gpus))
        m = load_model(model)
        result = clamp(m, calib, config, output=output, force=force, progress=BarProgress(quiet))
        report = result.report
        ev = None
        if eval_data is not None:
            preprocess = pp.resolve(m)
            trig = Trigger.from_files(trigger, mask, preprocess)
            ev = before_after(m, result.proto, open_labelled(eval_data, preprocess), preprocess, trigger=trig,
                              target=target, provider=provider)
            report = dataclasses.replace(report, evaluation={k: v.to_dict() for k, v in ev.items()})
        write_json(json_out, report.to_json())
        write_summary(summary, report)
        write_html(html_out, report)
    if not quiet:
        console.print(bounds_table(report))
        print_notes(report.notes)
        v = report.verification
        if v is not None:
            console.print(f"[bold]verified[/] {', '.join(f'{k}: {val}' for k, val in v['checks'].items())}")
        console.print(f"calibration predictions unchanged: {100 * report.calibration_agreement:.1f}%")
        if ev is not None:
            console.print(evaluation_table([("original", ev["before"]), ("clamped", ev["after"])]))
        console.print(f"[bold green]wrote[/] {output}")
    raise typer.Exit(ExitCode.OK)


def bounds_table(report: ClampReport) -> Table:
    """One row per bounded map."""
    cfg = report.config
    table = Table(title=f"{len(report.maps)} maps bounded: {cfg['granularity']} granularity, "
                        f"quantile {cfg['quantile']:g}, margin {cfg['margin']:g}", title_justify="left")
    for col in ("map", "granularity", "bounds", "two-sided", "mean τ", "max τ"):
        table.add_column(col)
    for mp in report.maps:
        table.add_row(mp.tap, mp.granularity, str(mp.elements), "yes" if mp.two_sided else "",
                      f"{mp.hi_mean:.3g}", f"{mp.hi_max:.3g}")
    return table


