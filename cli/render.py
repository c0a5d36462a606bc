"""Rich renderings of library results (stderr)."""

from __future__ import annotations

import numpy as np
from rich.table import Table

from onnx_linf.commands.ratio import SweepResult
from onnx_linf.report.types import ScanReport

from .console import console


def model_summary(report: ScanReport) -> None:
    """Model, provider, preprocessing and calibration lines."""
    m = report.model
    pp = report.preprocess
    console.print(f"[bold]model[/] {m.path}  opset {m.opset}  input {m.input} {m.input_shape}  "
                  f"sha256 {m.sha256[:12]}")
    if report.calibration.get("data_free"):
        console.print(f"[bold]provider[/] {report.provider}   [bold]calibration[/] none (data-free scan)")
    else:
        console.print(f"[bold]provider[/] {report.provider}   [bold]calibration[/] {report.calibration['source']} "
                      f"(batch {report.calibration['batch_size']})")
    console.print(f"[bold]preprocessing[/] ({pp['source']}) size {pp['size'][0]}x{pp['size'][1]} "
                  f"{pp['layout']} {pp['channels']} scale {pp['scale']:.6g} mean {pp['mean']} std {pp['std']}")


def taps_table(report: ScanReport, top: int = 3) -> Table:
    """Per tap: shape, and the most extreme channels by the policy's score."""
    score = report.policy["score"]
    table = Table(title=f"activation maps measured ({len(report.taps)}); top channels by {score}",
                  title_justify="left")
    table.add_column("tap", overflow="fold")
    table.add_column("kind")
    table.add_column("C", justify="right")
    table.add_column("HxW", justify="right")
    table.add_column(f"top channels: {score} (mean ℓ∞ clean / max)")
    table.add_column("flagged", justify="right")
    for tap in report.taps:
        linf = tap.stats.get("linf")
        scores = np.asarray(tap.scores)
        order = np.argsort(-scores, kind="stable")[:top] if scores.size else []
        cells = []
        for c in order:
            extra = f" ({linf.mean[c]:.3g}/{linf.max[c]:.3g})" if linf else ""
            cells.append(f"#{c} {scores[c]:.3g}{extra}")
        hw = "x".join("?" if d is None else str(d) for d in tap.spatial)
        name = tap.name + (" (last)" if tap.is_last else "")
        table.add_row(name, tap.kind, str(tap.channels), hw, ", ".join(cells), str(len(tap.flagged)))
    return table


def flagged_lines(report: ScanReport) -> None:
    """The flagged channels, labelled for what they are."""
    flagged = report.flagged_channels()
    total = sum(len(v) for v in flagged.values())
    what = "evidence-ranked" if report.policy["evidence"] else "most active on clean images (not backdoor evidence)"
    console.print(f"[bold]flagged[/] {total} channels in {len(flagged)} maps — {what}")
    for tap, chans in list(flagged.items())[:12]:
        console.print(f"  {tap}: {chans[:16]}{' ...' if len(chans) > 16 else ''}")
    if len(flagged) > 12:
        console.print(f"  ... and {len(flagged) - 12} more maps (see --json)")


def synthesis_table(synthesis: dict) -> Table:
    """Per-class synthesized trigger sizes and anomaly indices, from a report's ``synthesis`` section."""
    skipped = synthesis.get("not_examined") or {}
    left_out = "".join(f", {len(v)} not examined ({k})" for k, v in skipped.items() if k != "not requested")
    table = Table(title=f"synthesized triggers ({len(synthesis['classes'])} classes{left_out}, {synthesis['queries']} "
                        f"queries, {synthesis['seconds']:.1f} s)", title_justify="left")
    for col in ("class", "mask L1", "ASR", "ℓ∞ top share", "anomaly", ""):
        table.add_column(col, justify="right" if col else "left")
    for c in synthesis["classes"]:
        mark = "suspected" if c["target"] in synthesis["suspected"] else "" if c["found"] else "not found"
        share = "" if c["concentration"] is None else f"{c['concentration']:.2f}"
        table.add_row(str(c["target"]), f"{c['mask_l1']:.1f}", f"{c['asr']:.2f}", share, f"{c['anomaly']:.2f}", mark)
    return table


def families_table(families: list[dict]) -> Table:
    """The verdict's evidence families: what each checked, its statistic, threshold, result and cost."""
    table = Table(title="evidence families (suspected when any is)", title_justify="left")
    for col in ("family", "top class", "statistic", "second", "threshold", "result", "forwards", "seconds"):
        table.add_column(col, justify="left" if col in ("family", "result") else "right")
    for f in families:
        second = "" if f["second_statistic"] is None else f"{f['second_statistic']:.2f}"
        top = "" if f["top_statistic"] is None else f"{f['top_statistic']:.2f}"
        table.add_row(f"{f['family']} ({f['statistic']})", str(f["top_class"]), top, second, f"{f['threshold']:g}",
                      "suspected" if f["suspected"] else "clean", str(f["queries"]), f"{f['seconds']:.1f}")
    return table


def datafree_table(datafree: dict) -> Table:
    """The data-free checks: statistic, threshold, result and cost, from a report's ``datafree`` section."""
    table = Table(title=f"data-free checks ({datafree['queries']} forwards)", title_justify="left")
    for col in ("check", "statistic", "threshold", "result", "details"):
        table.add_column(col, justify="right" if col in ("statistic", "threshold") else "left")
    for c in datafree["checks"]:
        result = "suspected" if c["suspected"] else "clean"
        if c["check"] == "clp":
            what = "CLP robust z (weights)"
            details = f"{c['layer']} #{c['channel']}, {c['layers_scored']} convs scored"
        else:
            what = "max-margin ratio (noise inputs)"
            left = f", {len(c['not_examined'])} classes not examined" if c["not_examined"] else ""
            details = f"top class {c['top_class']}, {c['queries']} forwards, {c['seconds']:.1f} s{left}"
        table.add_row(what, f"{c['statistic']:.2f}", f"{c['threshold']:g}", result, details)
    return table


def print_notes(notes: list[str] | None) -> None:
    """A report's notes (things a reader must know about the numbers), one line each."""
    for note in notes or ():
        console.print(f"[yellow]note[/] {note}")


def sweep_table(result: SweepResult) -> Table:
    """ACC / ASR per ratio, the chosen one marked."""
    table = Table(title=f"pruning sweep ({result.score}); original ACC {100 * result.base_accuracy:.2f}%, "
                        f"ASR {100 * result.base_asr:.1f}% (target {result.target})", title_justify="left")
    for col in ("ratio", "channels", "clean ACC", "ASR", ""):
        table.add_column(col, justify="right")
    for row in result.rows:
        mark = "chosen" if result.chosen is not None and row.ratio == result.chosen.ratio else ""
        table.add_row(f"{row.ratio:g}", str(row.channels), f"{100 * row.accuracy:.2f}%", f"{100 * row.asr:.1f}%",
                      mark)
    return table
