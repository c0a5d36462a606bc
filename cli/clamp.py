"""``onnx-linf clamp``: bound every activation map to its clean range (trigger-free sanitising)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.table import Table

from onnx_linf.commands.clamp import DEFAULT_POWER, GATED_OUTPUT, ClampConfig, clamp
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


def _gate_default() -> str:
    gate = ClampConfig.gate
    return "off" if gate is None else gate if isinstance(gate, str) else f"{gate:g}"


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
    excess: Annotated[str, typer.Option(help="A value above its position bound: fold (reflected at the bound, "
                                        "2*bound - value, floored), clip (kept at the bound), or auto: fold at "
                                        "--quantile 100, clip below.")]
    = ClampConfig.excess,
    bounds: Annotated[str, typer.Option(help="Bounds to apply, comma-separated: position (the l-inf clamp) "
                                        "and/or channel-mean (per-image channel means, for triggers spread "
                                        "over the whole image).")] = "position,channel-mean",
    strength: Annotated[str, typer.Option(help="Channel-mean bound: 'auto' (cross-fitted on the calibration "
                                          "images) or the percentile of clean channel means to bound at.")]
    = "auto",
    power: Annotated[float, typer.Option(help="Exponent p of the channel-mean scale min(bound / mean, 1)^p.")]
    = DEFAULT_POWER,
    strength_budget: Annotated[float, typer.Option(help="--strength auto: the estimated accuracy drop (fraction, "
                                                   "label-free, cross-fitted) the channel-mean bound may add to "
                                                   "the position clamp's.")] = ClampConfig.slack,
    gate: Annotated[str, typer.Option(help="Score gate: images whose anomaly score passes the gate threshold get "
                                      "their channel means bounded at this percentile of clean ones (or 'mean': "
                                      "their average) from that map on; 'off' for none. Needs --strength auto.")]
    = _gate_default(),
    gate_alarm: Annotated[str, typer.Option(metavar="SHARE[,SHARE...]",
                                            help="--gate: the largest share of new clean images allowed "
                                            "above the gate threshold (held with 95% confidence: a tolerance "
                                            "bound on the held-out calibration scores); comma-separated: tried "
                                            "largest first, the first within the budget kept.")]
    = ",".join(f"{a:g}" for a in ClampConfig().gate_alarms),
    low_evidence: Annotated[bool, typer.Option("--low-evidence/--no-low-evidence",
                                               help="The score and the gate also read how far an image's "
                                               "channel means fall below the smallest clean ones (triggers "
                                               "that lower activity, e.g. a blend). Evidence only.")]
    = ClampConfig.low_evidence,
    evidence_quantile: Annotated[str, typer.Option(help="--strength auto: where the chosen strength is above this "
                                                   "percentile, grade the channel-mean evidence against it instead "
                                                   "of the bound ('bound' for the bound itself).")]
    = "bound" if ClampConfig.evidence_quantile is None else f"{ClampConfig.evidence_quantile:g}",
    score_output: Annotated[bool, typer.Option("--score-output", help="Add the graph output onnx_linf_score "
                                               "[N]: a per-image anomaly score from the same forward pass.")]
    = False,
    gate_output: Annotated[bool, typer.Option("--gate-output", help="Add the graph output onnx_linf_gated [N] "
                                              "(bool): the images the score gate flagged, for a deployment to "
                                              "refuse (their predictions are not their class).")] = False,
    suspects: Annotated[str, typer.Option(metavar="none|auto|CLASS[,CLASS...]|REPORT.json",
                                          help="Classes an input the score gate flags must never be given: "
                                          "'auto' (the probe families of scan --verdict, run here: about 33k "
                                          "forwards), class indices, a scan --json report of this model (its "
                                          "suspected classes, no extra cost), or 'none'.")]
    = str(ClampConfig.suspects),
    unsuspected_alarm: Annotated[str, typer.Option(help="Where --suspects names no class, cap the gate's alarms at "
                                                   "this share ('none': no cap).")]
    = f"{ClampConfig.unsuspected_alarm:g}" if ClampConfig.unsuspected_alarm is not None else "none",
    gate_response: Annotated[str, typer.Option(help="What the gate does to a flagged input: average (channel means "
                                               "bounded at --gate), exclude (with --suspects: only the exclusion), "
                                               "or auto: exclude where a class is suspected, else average.")]
    = ClampConfig.gate_response,
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
                             margin=margin, excess=excess, batch_size=batch_size, provider=provider, limit=limit,
                             preprocess=pp,
                             min_agreement=min_agreement, engine=o.engine_options(ray, ray_workers, ray_gpus),
                             bounds=parse_bounds(bounds), strength=parse_strength(strength), power=power,
                             slack=strength_budget, gate=parse_gate(gate), gate_alarm=parse_alarms(gate_alarm),
                             low_evidence=low_evidence, evidence_quantile=parse_evidence_quantile(evidence_quantile),
                             score_output=score_output, gate_output=gate_output,
                             suspects=parse_suspects(suspects), gate_response=gate_response,
                             unsuspected_alarm=parse_cap(unsuspected_alarm))
        m = load_model(model)
        result = clamp(m, calib, config, output=output, force=force, progress=BarProgress(quiet))
        report = result.report
        ev = None
        if eval_data is not None:
            preprocess = pp.resolve(m)
            trig = Trigger.from_files(trigger, mask, preprocess)
            ev = before_after(m, result.proto, open_labelled(eval_data, preprocess), preprocess, trigger=trig,
                              target=target, provider=provider, refusal=GATED_OUTPUT if gate_output else None)
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
        if report.strength is not None:
            console.print(strength_line(report.strength))
            if report.strength.get("gate") is not None:
                console.print(gate_line(report.strength["gate"]))
        if report.score is not None and report.score["threshold_1pct"] is not None:
            console.print(f"score output [bold]{report.score['output']}[/]: 1% of held-out clean images score "
                          f"above {report.score['threshold_1pct']:.3g}")
        console.print(f"calibration predictions unchanged: {100 * report.calibration_agreement:.1f}%")
        if ev is not None:
            console.print(evaluation_table([("original", ev["before"]), ("clamped", ev["after"])]))
        console.print(f"[bold green]wrote[/] {output}")
    raise typer.Exit(ExitCode.OK)


def bounds_table(report: ClampReport) -> Table:
    """One row per bounded map."""
    cfg = report.config
    table = Table(title=f"{len(report.maps)} maps bounded: {cfg['granularity']} granularity, "
                        f"quantile {cfg['quantile']:g}, margin {cfg['margin']:g}, excess {cfg.get('excess', 'clip')}",
                  title_justify="left")
    for col in ("map", "granularity", "bounds", "two-sided", "mean τ", "max τ", "channel means", "acts on"):
        table.add_column(col)
    fmt = lambda v, f=".3g": "" if v is None else format(v, f)  # noqa: E731
    for mp in report.maps:
        table.add_row(mp.tap, mp.granularity, str(mp.elements), "yes" if mp.two_sided else "",
                      fmt(mp.hi_mean), fmt(mp.hi_max), mp.mean_bound or "",
                      "" if mp.mean_scaled is None else f"{100 * mp.mean_scaled:.2f}%")
    return table


def parse_bounds(value: str) -> tuple[str, ...]:
    """'position,channel-mean' -> ('position', 'channel-mean')."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def parse_alarms(value: str) -> tuple[float, ...]:
    """'0.01,0.005' -> (0.01, 0.005); ranges are checked by `ClampConfig.validate`."""
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--gate-alarm takes shares in (0, 0.5), comma-separated, got {value!r}") from None


def parse_gate(value: str) -> float | str | None:
    """'off', 'mean' or a percentile."""
    v = value.strip().lower()
    if v in ("off", "none", "no"):
        return None
    if v == "mean":
        return "mean"
    try:
        return float(v)
    except ValueError:
        raise UsageError(f"--gate takes 'off', 'mean' or a percentile in (0, 100], got {value!r}") from None


def gate_line(gate: dict) -> str:
    """What the score gate does, in one line."""
    bound = "their clean average" if gate["quantile"] == "mean" else f"the {gate['quantile']:g}th percentile"
    if not gate["kept"]:
        return f"score gate [bold]off[/]: {gate.get('reason', '')}"
    last = gate["tried"][-1]
    weaker = (f"; strength raised from {gate['strength_without_gate']:g} to fit the budget"
              if last["quantile"] != gate["strength_without_gate"] else "")
    confidence = gate.get("confidence")
    held = (f"at most {100 * gate['alarm']:g}% of clean images, with {100 * confidence:.0f}% confidence"
            if confidence is not None else f"{100 * gate['alarm']:g}% of held-out clean images")
    low = gate.get("low_threshold")
    below = (f", or whose evidence below the clean minima is above {low:.3g} (the largest held-out clean value)"
             if low is not None else "")
    return (f"score gate [bold]on[/]: images whose channel-mean evidence is above {gate['threshold']:.3g} "
            f"({held}){below} "
            + ("are flagged" if gate.get("response") == "exclude" else f"get channel means bounded at {bound}")
            + f" (held-out est. drop {100 * last['estimated_drop']:.2f} pt"
            + (" of the averaging response, the one the budget checks" if gate.get("response") == "exclude" else "")
            + f"{weaker})"
            + (f"; output [bold]{gate['output']}[/] names them" if gate.get("output") else "")
            + (_suspects_text(gate["suspects"], gate.get("response")) if gate.get("suspects") is not None else ""))


def _suspects_text(suspects: dict, response: str | None) -> str:
    where = {"probes": "the probe families", "given": "--suspects"}.get(suspects["source"], suspects["source"])
    classes = ", ".join(str(c) for c in suspects["classes"])
    kept = "; otherwise bounded as any other input" if response == "exclude" else ""
    return (f"; never given class {classes} (suspected by {where}){kept}" if classes
            else f"; no class excluded (none suspected by {where})")


def parse_cap(value: str) -> float | None:
    """'none' or a share; the range is checked by `ClampConfig.validate`."""
    if value.strip().lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"--unsuspected-alarm takes a share in (0, 0.5) or none, got {value!r}") from None


def parse_suspects(value: str) -> str | tuple[int, ...]:
    """'none', 'auto', '0,3' -> (0, 3), or a report path."""
    v = value.strip()
    if v.lower() in ("none", "auto"):
        return v.lower()
    if v.lower().endswith(".json"):
        return v
    try:
        return tuple(int(c) for c in v.split(","))
    except ValueError:
        raise UsageError(f"--suspects takes none, auto, class indices (e.g. 0,3) or a scan report .json, "
                         f"got {value!r}") from None


def parse_evidence_quantile(value: str) -> float | None:
    """'bound' or a percentile in (0, 100)."""
    if value.strip().lower() == "bound":
        return None
    try:
        q = float(value)
    except ValueError:
        q = float("nan")
    if not 0 < q < 100:
        raise UsageError(f"--evidence-quantile takes 'bound' or a percentile in (0, 100), got {value!r}")
    return q


def parse_strength(value: str) -> float | str:
    """'auto' or a percentile."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"--strength takes 'auto' or a percentile in (0, 100], got {value!r}") from None


def strength_line(strength: dict) -> str:
    """How the channel-mean strength was chosen, in one line."""
    if strength["mode"] == "fixed":
        return (f"channel-mean bound at the {strength['quantile']:g}th percentile of clean means, "
                f"p = {strength['power']:g}")
    rows = {r["quantile"]: r for r in strength["candidates"]}
    row = rows[strength["quantile"]]
    cost = "estimated accuracy drop" if strength["rule"] == "softmax" else "changed predictions"
    return (f"channel-mean strength [bold]auto[/]: percentile {strength['quantile']:g} (p = {strength['power']:g}), "
            f"the lowest of {', '.join(f'{q:g}' for q in rows)} whose held-out {cost} stays within "
            f"{100 * strength['slack']:g} pt of percentile 100 ({strength['folds']}-fold cross-fit: "
            f"{100 * row['changed']:.2f}% changed, est. drop {100 * row['estimated_drop']:.2f} pt)")


