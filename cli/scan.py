"""``onnx-linf scan``: measure per-channel ℓ∞/ℓ1/ℓ2 statistics and flag channels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from onnx_linf.commands.evidence import Evidence
from onnx_linf.commands.gate import judge
from onnx_linf.commands.options import ScanConfig
from onnx_linf.commands.scan import scan
from onnx_linf.errors import UsageError

from . import options as o
from .console import BarProgress, console, user_errors, write_json
from .exit_codes import ExitCode
from .outputs import HtmlOut, SarifOut, SummaryOut, check_html, check_targets, write_html, write_sarif, write_summary
from .render import flagged_lines, model_summary, print_notes, synthesis_table, taps_table


def scan_command(
    model: o.ModelArg,
    calib: o.CalibOpt,
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
    fail_on_suspect: Annotated[bool, typer.Option("--fail-on-suspect", help="Exit 1 when a backdoor is "
                                                  "suspected (CI gate; needs --synthesize).")] = False,
    classes: o.SynthClasses = None,
    seed: o.SynthSeed = 0,
    max_queries: o.MaxQueries = None,
    time_limit: o.TimeLimit = None,
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="Images per inference batch, or 'auto' "
                                            "(the largest that fits in memory; reported).")] = "32",
    provider: o.Provider = "auto",
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
    quiet: o.Quiet = False,
) -> None:
    """Measure per-channel ℓ∞/ℓ1/ℓ2 statistics of every conv activation map on calibration images.

    For a CI gate: --synthesize --fail-on-suspect searches a minimal trigger per class with forward
    passes only and exits 1 when one class is reached by an anomalously small trigger.

    Without trigger evidence, flagged channels are the most active ones on clean images: that is a
    description of the model, not evidence of a backdoor. Give --trigger/--mask or --suspect to
    rank channels by differential ℓ∞ (evidence minus clean).
    """
    with user_errors():
        check_targets(sarif, summary, html_out)
        check_html(html_out)
        config = ScanConfig(
            layers=o.parse_layers(layers), policy=policy, ratio=ratio, threshold=threshold, score=score,
            stats=tuple(s.strip() for s in stats.split(",") if s.strip()), batch_size=parse_batch(batch_size),
            provider=provider, limit=limit,
            preprocess=o.preprocess_options(size, layout, channels, scale, mean, std),
        )
        if fail_on_suspect and not synthesize:
            raise UsageError("--fail-on-suspect needs a verdict: add --synthesize")
        evidence = None
        if synthesize:
            evidence = Evidence(synthesize=o.synth_config(classes, seed, max_queries, time_limit))
        if trigger is not None or suspect is not None or mask is not None:
            if synthesize:
                raise UsageError("--synthesize searches its own trigger: drop --trigger/--mask/--suspect")
            evidence = Evidence(trigger=trigger, mask=mask, suspect=suspect)
        report = scan(model, calib, config, evidence=evidence, progress=BarProgress(quiet))
        outcome = judge(report, fail_on_suspect=fail_on_suspect)
        write_json(json_out, report.to_json())
        write_sarif(sarif, [outcome])
        write_summary(summary, outcome)
        write_html(html_out, outcome)
    if not quiet:
        model_summary(report)
        console.print(taps_table(report))
        flagged_lines(report)
        if "synthesis" in report.extra:
            console.print(synthesis_table(report.extra["synthesis"]))
        console.print(f"[bold]verdict[/] {report.verdict}: {report.verdict_reason}")
        print_notes(report.extra.get("notes"))
        _next_steps(model, calib, report.policy["evidence"])
    raise typer.Exit(ExitCode(outcome.exit_code))


def _next_steps(model: Path, calib: Path, evidence: bool) -> None:
    console.print("[bold]next[/]")
    console.print(f"  trigger-free sanitising:  onnx-linf clamp {model} --calib {calib} -o safe.onnx")
    if not evidence:
        console.print(f"  with a known trigger:     onnx-linf prune {model} --calib {calib} --ratio 0.1 "
                      "--trigger T.png --mask M.png -o clean.onnx")
    else:
        console.print(f"  prune these channels:     onnx-linf prune {model} --calib {calib} --from-report REPORT.json "
                      "-o clean.onnx")




def parse_batch(value: str) -> int | str:
    """'auto' or a positive integer."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--batch-size takes a positive integer or 'auto', got {value!r}") from None
