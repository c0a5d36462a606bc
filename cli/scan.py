"""``onnx-linf scan``: measure per-channel ℓ∞/ℓ1/ℓ2 statistics and flag channels."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from onnx_linf.commands.evidence import Evidence
from onnx_linf.commands.gate import judge
from onnx_linf.commands.options import HEATMAP_IMAGES
from onnx_linf.commands.scan import scan
from onnx_linf.commands.settings import effective, load_settings, record_settings, scan_options, settings_record
from onnx_linf.errors import UsageError
from onnx_linf.measure.margin import MarginConfig
from onnx_linf.model.triton import read_triton

from . import options as o
from .console import BarProgress, console, user_errors, write_json
from .exit_codes import ExitCode
from .outputs import HtmlOut, SarifOut, SummaryOut, check_html, check_targets, write_html, write_sarif, write_summary
from .render import (
    datafree_table,
    families_table,
    flagged_lines,
    model_summary,
    print_notes,
    synthesis_table,
    taps_table,
)
from .scan_many import ConfigOpt, given_settings, scan_folder

ModelsArg = Annotated[list[Path], typer.Argument(help="ONNX model file, or folders / several files (each "
                                                 "*.onnx scanned, one row each).", show_default=False)]


def scan_command(
    ctx: typer.Context,
    models: ModelsArg,
    calib: o.ScanCalibOpt = None,
    layers: o.Layers = "all",
    ratio: Annotated[float, typer.Option(help="Fraction of channels per map to flag (ratio policy).")] = 0.1,
    policy: Annotated[str, typer.Option(help="ratio (top fraction per map) or outliers (robust z-score).")] = "ratio",
    threshold: Annotated[float, typer.Option(help="Robust z-score threshold of the outliers policy.")] = 3.5,
    score: Annotated[str, typer.Option(help="Statistic to rank by: linf, l1 or l2.")] = "linf",
    stats: Annotated[str, typer.Option(help="Statistics to measure, comma-separated, of linf, l1, l2 (the "
                                       "--score one is always measured). l2 is off by default: it "
                                       "costs more than linf and l1 together.")] = "linf,l1",
    trigger: o.Trigger = None,
    mask: o.Mask = None,
    suspect: o.Suspect = None,
    synthesize: o.SynthFlag = False,
    verdict: o.VerdictFlag = False,
    fail_on_suspect: Annotated[bool, typer.Option("--fail-on-suspect", help="Exit 1 when a backdoor is "
                                                  "suspected (CI gate; needs --verdict or --synthesize, or "
                                                  "no --calib: the data-free verdict).")] = False,
    classes: o.SynthClasses = None,
    seed: o.SynthSeed = 0,
    max_queries: o.MaxQueries = None,
    time_limit: o.TimeLimit = None,
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="Images per inference batch, or 'auto' "
                                            "(the largest that fits in memory; reported).")] = "32",
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
    sarif: SarifOut = None,
    summary: SummaryOut = None,
    html_out: HtmlOut = None,
    config_file: ConfigOpt = None,
    skip_unscannable: Annotated[bool, typer.Option("--skip-unscannable", help="Folder scans: models that could "
                                                   "not be scanned do not fail the run (they are still "
                                                   "reported).")] = False,
    quiet: o.Quiet = False,
) -> None:
    """Measure per-channel ℓ∞/ℓ1/ℓ2 statistics of every conv activation map on calibration images.

    MODEL may be a folder or a Triton model repository: every *.onnx file in it is scanned, one row
    each, and the exit code is the worst; a model that could not be scanned fails the run (exit 2)
    unless --skip-unscannable. Settings come from --config, or onnx-linf.toml / pyproject.toml
    [tool.onnx-linf] found upward from the working directory; options given here win.

    For a CI gate: --verdict --fail-on-suspect runs every evidence family (noise-blend and grating
    probes for full-image triggers, and the patch search) and exits 1 when any family suspects a
    class. --synthesize alone is the patch search (a minimal trigger per class, forward passes only).

    Without --calib the scan is data-free: the CLP outlier of the conv weights and a query-only
    margin search from noise inputs (--max-queries, --time-limit and --seed bound and fix it) give a
    verdict labelled data-free; it is weaker than a scan with data.

    Without trigger evidence, flagged channels are the most active ones on clean images: that is a
    description of the model, not evidence of a backdoor. Give --trigger/--mask or --suspect to
    rank channels by differential ℓ∞ (evidence minus clean).
    """
    with user_errors():
        check_targets(sarif, summary, html_out)
        check_html(html_out)
        settings = load_settings(config_file)
        cli, defaults = given_settings(ctx, locals())
        evidence = None
        if trigger is not None or suspect is not None or mask is not None:
            evidence = Evidence(trigger=trigger, mask=mask, suspect=suspect)
        engine = o.engine_options(ray, ray_workers, ray_gpus)
        model = models[0]
        if calib is None and (len(models) > 1 or model.is_dir()):
            raise UsageError("folder and multi-model scans need --calib DATA",
                             hint="scan one model file without --calib for the data-free checks")
        if calib is None and ray:
            raise UsageError("--ray computes calibration statistics: it needs --calib DATA",
                             hint="the data-free checks run in this process")
        if len(models) > 1 or model.is_dir():
            scan_folder(models[0] if len(models) == 1 else models, calib, settings, cli, defaults, evidence,
                        skip_unscannable, json_out, sarif, summary, html_out, quiet, engine=engine)
        triton = read_triton(model)
        values = effective(settings, model, cli, defaults, None if triton is None else triton.size())
        config, evidence, fail_on_suspect = scan_options(values, evidence, data_free=calib is None)
        # Heatmaps only for the HTML report: they cost one more ORT session.
        config = dataclasses.replace(config, engine=engine, heatmap_images=HEATMAP_IMAGES if html_out else 0)
        margin = None if calib is not None else _margin_config(values)
        report = record_settings(scan(model, calib, config, evidence=evidence, progress=BarProgress(quiet),
                                      margin=margin), values, settings)
        outcome = judge(report, allowlist=settings.allowlist, fail_on_suspect=fail_on_suspect,
                        settings=None if settings.path is None else settings_record(values),
                        triton=None if triton is None else triton.to_dict())
        write_json(json_out, report.to_json())
        write_sarif(sarif, [outcome])
        write_summary(summary, outcome)
        write_html(html_out, outcome)
    if not quiet and calib is None:
        model_summary(report)
        console.print(datafree_table(report.extra["datafree"]))
        console.print(f"[bold]verdict[/] {report.verdict}: {report.verdict_reason}")
        for what in report.extra["datafree"]["not_checked"]:
            console.print(f"  not checked: {what}")
        console.print("[bold]next[/]")
        console.print(f"  with clean images (stronger):  onnx-linf scan {model} --calib DATA --verdict "
                      "--fail-on-suspect")
    elif not quiet:
        model_summary(report)
        console.print(taps_table(report))
        flagged_lines(report)
        if "synthesis" in report.extra:
            console.print(synthesis_table(report.extra["synthesis"]))
        if "evidence_families" in report.extra:
            console.print(families_table(report.extra["evidence_families"]))
        console.print(f"[bold]verdict[/] {report.verdict}: {report.verdict_reason}")
        print_notes(report.extra.get("notes"))
        _next_steps(model, calib, report.policy["evidence"])
    raise typer.Exit(ExitCode(outcome.exit_code))


def _margin_config(values: dict[str, dict]) -> MarginConfig:
    """The data-free margin probe's options from --max-queries, --time-limit and --seed."""
    v = {k: e["value"] for k, e in values.items()}
    config = MarginConfig(max_queries=v.get("max_queries") or MarginConfig.max_queries, seed=v.get("seed") or 0,
                          time_limit=v.get("time_limit"))
    config.validate()
    return config


def _next_steps(model: Path, calib: Path, evidence: bool) -> None:
    console.print("[bold]next[/]")
    console.print(f"  trigger-free sanitising:  onnx-linf clamp {model} --calib {calib} -o safe.onnx")
    if not evidence:
        console.print(f"  with a known trigger:     onnx-linf prune {model} --calib {calib} --ratio 0.1 "
                      "--trigger T.png --mask M.png -o clean.onnx")
    else:
        console.print(f"  prune these channels:     onnx-linf prune {model} --calib {calib} --from-report REPORT.json "
                      "-o clean.onnx")
