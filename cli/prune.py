"""``onnx-linf prune``: zero the channels trigger evidence drives, verify, write, and show the effect."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from onnx_linf.commands.common import MIN_AGREEMENT
from onnx_linf.commands.evidence import Evidence
from onnx_linf.commands.options import ScanConfig
from onnx_linf.commands.prune import PruneConfig, prune
from onnx_linf.commands.ratio import SweepResult, SweepRow
from onnx_linf.errors import UsageError
from onnx_linf.measure.accuracy import before_after, open_labelled
from onnx_linf.measure.preprocess import Trigger
from onnx_linf.measure.probes import ProbeConfig
from onnx_linf.model.load import load_model

from . import options as o
from .console import BarProgress, console, user_errors, write_json
from .evaluate import evaluation_table
from .exit_codes import ExitCode
from .render import print_notes, sweep_table

Output = Annotated[Path, typer.Option("--output", "-o", help="Where to write the pruned model (never the input).")]
EvalData = Annotated[Optional[Path], typer.Option("--eval-data", help="Labelled data to show clean ACC and ASR "
                                                  "before and after (with --trigger/--mask and --target).")]
Target = Annotated[Optional[int], typer.Option("--target", help="Attack target class, for the ASR.")]


def prune_command(
    model: o.ModelArg,
    calib: o.CalibOpt,
    output: Output,
    ratio: Annotated[float, typer.Option(help="Fraction of channels per map to zero (ratio policy).")] = 0.1,
    layers: o.Layers = "last",
    policy: Annotated[str, typer.Option(help="ratio or outliers.")] = "ratio",
    threshold: Annotated[float, typer.Option(help="Robust z-score threshold of the outliers policy.")] = 3.5,
    score: Annotated[str, typer.Option(help="Norm to rank by: linf (the paper's), l1 or l2.")] = "linf",
    trigger: o.Trigger = None,
    mask: o.Mask = None,
    suspect: o.Suspect = None,
    synthesize: Annotated[bool, typer.Option("--synthesize", help="Evidence from the patch search alone (no "
                                             "probe families).")] = False,
    verdict: Annotated[bool, typer.Option("--verdict", help="Evidence from the verdict (the default when no "
                                          "evidence is given): the patch search's trigger, or the best probe of "
                                          "a class only the probe families suspect.")] = False,
    classes: o.SynthClasses = None,
    seed: o.SynthSeed = 0,
    max_queries: o.MaxQueries = None,
    time_limit: o.TimeLimit = None,
    from_report: Annotated[Optional[Path], typer.Option("--from-report", help="Prune exactly the channels a "
                                                        "scan report flagged.")] = None,
    evidence_mode: Annotated[str, typer.Option("--evidence", help="'required' (default), or 'none' to rank by "
                                               "clean activity — for study only, it does not find backdoors.")]
    = "required",
    fold: Annotated[bool, typer.Option("--fold/--no-fold", help="Fold zeroing into weights where exact.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file (never the input).")]
    = False,
    max_acc_drop: Annotated[Optional[float], typer.Option("--max-acc-drop", help="Choose the ratio automatically: "
                                                          "lowest trigger ASR with clean accuracy down by at most "
                                                          "this fraction (needs labels).")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Labelled data for --max-acc-drop (default: "
                                                   "the calibration data, if labelled).")] = None,
    eval_data: EvalData = None,
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
    quiet: o.Quiet = False,
) -> None:
    """Zero the channels most driven by a trigger (differential ℓ∞), verify the model, and write it.

    Evidence: --trigger/--mask (stamped on the calibration images), --suspect (real triggered
    images), --from-report, or --verdict (the default when none is given): the evidence families of
    ``scan --verdict`` run, and the channels are ranked by the trigger of the suspected class: the
    patch search's synthesized trigger, or, when only a probe family suspects it (a full-image
    trigger), that family's best probe (a grating or a noise blend) stamped on every image.
    --synthesize uses the patch search alone. The pruned model is
    checked (onnx.checker, ONNX Runtime, outputs equal to the original with those channels masked)
    before it is written, and the top-1 class of the verification images must mostly stay the same
    (--min-agreement); a failed check writes nothing and exits 1.
    """
    with user_errors():
        pp = o.preprocess_options(size, layout, channels, scale, mean, std)
        config = PruneConfig(
            scan=ScanConfig(layers=o.parse_layers(layers), policy=policy, ratio=ratio, threshold=threshold,
                            score=score, batch_size=batch_size, provider=provider, limit=limit, preprocess=pp,
                            engine=o.engine_options(ray, ray_workers, ray_gpus)),
            evidence=evidence_mode, fold=fold, max_acc_drop=max_acc_drop, labels=labels, target=target,
            synthesize=o.synth_config(classes, seed, max_queries, time_limit), min_agreement=min_agreement,
            probes=ProbeConfig(seed=seed),
        )
        evidence = None
        if synthesize and verdict:
            raise UsageError("--synthesize is the patch search alone, --verdict adds the probes: give one")
        if synthesize or verdict:
            # The searched trigger ranks the channels; a --trigger given too only measures the ASR.
            if suspect is not None:
                raise UsageError(f"--{'verdict' if verdict else 'synthesize'} searches its own trigger: drop --suspect")
            evidence = Evidence(synthesize=config.synthesize, probes=config.probes if verdict else None)
        elif trigger is not None or suspect is not None or mask is not None:
            evidence = Evidence(trigger=trigger, mask=mask, suspect=suspect)
        if eval_data is not None and (trigger is None or target is None):
            raise UsageError("--eval-data needs --trigger/--mask and --target to measure the ASR")
        if target is not None and eval_data is None and max_acc_drop is None:
            raise UsageError("--target is only used with --eval-data or --max-acc-drop")
        m = load_model(model)
        progress = BarProgress(quiet)
        result = prune(m, calib, config, evidence=evidence, from_report=from_report, output=output, force=force,
                       progress=progress)
        report = result.report
        if eval_data is not None:
            preprocess = pp.resolve(m)
            trig = Trigger.from_files(trigger, mask, preprocess)
            ev = before_after(m, result.proto, open_labelled(eval_data, preprocess), preprocess, trigger=trig,
                              target=target, provider=provider)
            report = dataclasses.replace(report, extra={**report.extra,
                                                         "evaluation": {k: v.to_dict() for k, v in ev.items()}})
        write_json(json_out, report.to_json())
    if not quiet:
        if report.extra.get("sweep"):
            sw = dict(report.extra["sweep"])
            sw["rows"] = tuple(SweepRow(**r) for r in sw["rows"])
            sw["chosen"] = SweepRow(**sw["chosen"]) if sw["chosen"] else None
            console.print(sweep_table(SweepResult(**sw)))
        console.print(surgery_table(report.extra["surgery"], report.policy["score"]))
        v = report.extra["verification"]
        console.print(f"[bold]verified[/] {', '.join(f'{k}: {val}' for k, val in v['checks'].items())}")
        console.print(f"calibration predictions unchanged: {100 * report.extra['calibration_agreement']:.1f}%")
        if eval_data is not None:
            console.print(evaluation_table([("original", ev["before"]), ("pruned", ev["after"])]))
        console.print(f"[bold green]wrote[/] {output}")
        print_notes(report.extra.get("notes"))
    raise typer.Exit(ExitCode.OK)


def surgery_table(records: list[dict], score: str) -> Table:
    """Which channels of which map were zeroed, and how."""
    table = Table(title=f"channels zeroed (ranked by {score})", title_justify="left")
    table.add_column("tap")
    table.add_column("channels", justify="right")
    table.add_column("method")
    table.add_column("which")
    for r in records:
        chans = list(r["channels"])
        table.add_row(r["tap"], str(len(chans)), r["method"], str(chans[:12]) + (" ..." if len(chans) > 12 else ""))
    return table
