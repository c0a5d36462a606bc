"""Self-contained HTML report: inline CSS, figures as base64 PNG data URIs, no script, no network.

It opens from disk in any browser and can be attached to a ticket or a CI run as one file. Written
from the report object alone (its JSON sections plus `visuals.Visuals`); nothing is measured here.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json

from .. import __version__
from . import plots
from .many import ModelOutcome, ScanManyReport
from .types import ClampReport, ScanReport, SynthesisReport

#: Per-channel figures drawn per report; maps beyond this are listed in the table only.
MAX_MAP_FIGURES = 24

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1f2933;background:#f5f7fa}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d9e2ec}
h3{font-size:15px;margin:18px 0 6px}
.sub{color:#52606d}.card{background:#fff;border:1px solid #d9e2ec;border-radius:6px;padding:14px 18px;margin:12px 0}
.verdict{display:inline-block;font-weight:600;padding:4px 10px;border-radius:4px;margin-right:8px}
.v-clean{background:#e3f9e5;color:#1f6e2a}.v-suspected,.v-unscannable,.v-allowlist-expired{background:#fde8e8;color:#9b1c1c}
.v-not-assessed,.v-verified{background:#eef2f7;color:#3e4c59}.v-written{background:#e3f9e5;color:#1f6e2a}.v-allowlisted{background:#fff4e0;color:#8a5300}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{border:1px solid #d9e2ec;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f0f4f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;word-break:break-all}
img.fig{max-width:100%;height:auto;display:block;margin:8px 0}
.triggers{display:flex;flex-wrap:wrap;gap:12px}.trig{text-align:center;font-size:12px}
.trig img{image-rendering:pixelated;border:1px solid #d9e2ec;margin:2px}
.note{background:#fffbea;border-left:3px solid #f0b429;padding:6px 10px;margin:6px 0}
footer{color:#7b8794;font-size:12px;margin-top:32px}
"""


def esc(value) -> str:
    """HTML-escaped text."""
    return html.escape(str(value), quote=True)


def img(png: bytes, alt: str, cls: str = "fig") -> str:
    """An <img> with the PNG inline as a data URI."""
    return f'<img class="{cls}" alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def table(header: list[str] | None, rows: list[list], numeric: tuple[int, ...] = ()) -> str:
    """An HTML table (no header row for None); cells are escaped unless wrapped in `Raw`."""
    if header is None:
        return "<table><tbody>" + "".join(f"<tr><th>{esc(k)}</th><td>{_cell(v)}</td></tr>" for k, v in rows) + \
            "</tbody></table>"
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{_cell(v)}</td>' if i in numeric else f"<td>{_cell(v)}</td>" for i, v in enumerate(row))
        + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Raw(str):
    """Markup that `table` must not escape."""


def _cell(v) -> str:
    return v if isinstance(v, Raw) else esc(v)


#: Badge text (no emoji: a browser without an emoji font shows boxes).
LABELS = {"clean": "clean", "suspected": "backdoor suspected", "not-assessed": "not assessed",
          "allowlisted": "suspected, allowlisted", "allowlist-expired": "allowlist entry expired",
          "unscannable": "not scanned", "written": "verified and written", "verified": "verified"}


def badge(outcome: str) -> str:
    """The verdict badge."""
    label = LABELS.get(outcome, outcome)
    return f'<span class="verdict v-{esc(outcome)}">{esc(label)}</span>'


def provenance(model, provider: str | None, preprocess: dict, calibration: dict, extra: list | None = None) -> str:
    """Where the numbers come from: model identity, tool, runtime, preprocessing, data."""
    pp = preprocess
    rows = [
        ["model", Raw(f"<code>{esc(model.path)}</code>")],
        ["sha256", Raw(f"<code>{esc(model.sha256)}</code>")],
        ["opset / input", f"{model.opset} / {model.input} {model.input_shape}"],
        ["tool", f"onnx-linf {__version__}"],
        *([["ONNX Runtime provider", provider]] if provider else []),
        ["preprocessing", f"({pp.get('source')}) size {pp.get('size')} {pp.get('layout')} {pp.get('channels')} "
                          f"scale {pp.get('scale'):.6g} mean {pp.get('mean')} std {pp.get('std')}"],
        ["calibration data", ", ".join(f"{k} {v}" for k, v in calibration.items())],
    ]
    return table(None, rows + (extra or []))


def _notes(notes) -> str:
    return "".join(f'<div class="note">{esc(n)}</div>' for n in notes or ())


def _trigger_cards(triggers, synthesis: dict | None) -> str:
    info = {c["target"]: c for c in (synthesis or {}).get("classes", [])}
    suspected = set((synthesis or {}).get("suspected", []))
    cards = []
    for t in triggers:
        c = info.get(t.target, {})
        stamp = t.pattern * t.mask[..., None]
        label = f"class {t.target}" + (" — suspected" if t.target in suspected else "")
        stats = "" if not c else (f"mask L1 {c['mask_l1']:.1f}, ASR {c['asr']:.2f}"
                                  + ("" if c["found"] else ", not found"))
        cards.append(f'<div class="trig">{img(plots.image_png(stamp), f"trigger {t.target}", "t")}'
                     f'{img(plots.image_png(t.mask), f"mask {t.target}", "t")}<br><b>{esc(label)}</b><br>'
                     f'{esc(stats)}</div>')
    return ('<p class="sub">Each class: the trigger as stamped (pattern × mask) and its mask (white = trigger).</p>'
            f'<div class="triggers">{"".join(cards)}</div>')


def synthesis_section(synthesis: dict, triggers) -> str:
    """Per-class chart, trigger and mask images, per-class table."""
    rows = [[c["target"], f"{c['mask_l1']:.1f}", f"{c['asr']:.2f}", "yes" if c["found"] else "no",
             c.get("start", ""), "" if c.get("concentration") is None else f"{c['concentration']:.2f}",
             f"{c['anomaly']:.2f}", "suspected" if c["target"] in synthesis["suspected"] else ""]
            for c in synthesis["classes"]]
    out = [f"<h2>Trigger synthesis</h2><p>{len(synthesis['classes'])} classes searched, {synthesis['queries']} "
           f"image forward passes, {synthesis['seconds']:.1f} s; a class is suspected when its anomaly index "
           f"exceeds {synthesis['threshold']:g}.</p>"]
    if not synthesis["complete"]:
        out.append('<div class="note">The query budget or time limit cut the search short: not every class '
                   "was searched.</div>")
    out.append(img(plots.synthesis_figure(synthesis), "mask norm and anomaly index per class"))
    if triggers:
        out.append(_trigger_cards(triggers, synthesis))
    out.append(table(["class", "mask L1", "ASR", "found", "start", "ℓ∞ top share", "anomaly", ""], rows,
                     numeric=(1, 2, 5, 6)))
    return "".join(out)


def _maps_section(report: ScanReport) -> str:
    score = report.policy.get("score", "")
    what = ("evidence-ranked" if report.policy.get("evidence")
            else "most active on clean images — not evidence of a backdoor")
    rows = []
    for t in report.taps:
        linf = t.stats.get("linf")
        hw = "x".join("?" if d is None else str(d) for d in t.spatial)
        rows.append([t.name + (" (last)" if t.is_last else ""), t.kind, t.channels, hw,
                     "" if linf is None else f"{max(linf.max):.3g}", len(t.flagged),
                     ", ".join(map(str, t.flagged[:16])) + (" …" if len(t.flagged) > 16 else "")])
    out = [f"<h2>Activation maps</h2><p>{len(report.taps)} maps measured; channels ranked by <b>{esc(score)}</b>, "
           f"flagged channels are {esc(what)}.</p>",
           table(["map", "kind", "C", "H×W", "max ℓ∞ (clean)", "flagged", "flagged channels"], rows, numeric=(2, 4, 5))]
    ex = report.extra.get("bounds_exceedance")
    if ex:
        out.append("<h3>Suspect images against the clean per-position range</h3>")
        out.append(table(["map", "images", "images outside", "elements outside (mean)", "max excess / clean max"],
                         [[k, v["images"], f"{100 * v['images_outside']:.0f}%",
                           f"{100 * v['mean_fraction_outside']:.2f}%", f"{v['max_relative_excess']:.2f}"]
                          for k, v in ex.items()], numeric=(1, 2, 3, 4)))
    out.append("<h3>Per-channel ℓ∞, clean vs evidence</h3>")
    if not any(t.evidence_stats for t in report.taps):
        out.append('<p class="sub">No evidence images: only the clean distribution is shown.</p>')
    for t in report.taps[:MAX_MAP_FIGURES]:
        out.append(img(plots.channel_figure(t, score), f"per-channel l-infinity of {t.name}"))
    if len(report.taps) > MAX_MAP_FIGURES:
        out.append(f'<p class="sub">{len(report.taps) - MAX_MAP_FIGURES} more maps are in the table and the JSON '
                   "report only.</p>")
    heat = report.visuals.heatmaps if report.visuals is not None else None
    if heat is not None and heat.maps:
        out.append(_heatmaps(heat))
    return "".join(out)


def _heatmaps(heat) -> str:
    n = len(heat.maps[0].clean)
    against = ""
    if heat.maps[0].evidence is not None:
        which = "the same images" if heat.evidence_label == "trigger-stamped" else "the first ones"
        against = f", clean against {esc(heat.evidence_label)} ({which})"
    out = ["<h3>Activation heatmaps of the flagged channels</h3>",
           f'<p class="sub">Where the chosen channels fire on {n} sample images{against}: each channel\'s map, '
           "computed in the graph (no gradients), upsampled bilinearly to the image and laid over it; a channel's "
           "colour scale is shared by its clean and evidence images.</p>"]
    for m in heat.maps:
        out.append(img(plots.heatmap_figure(m, heat.clean_pixels, heat.evidence_pixels, heat.evidence_label),
                       f"activation heatmaps of {m.tap} channels {', '.join(map(str, m.channels))}"))
    return "".join(out)


def scan_body(report: ScanReport, outcome: ModelOutcome | None = None) -> str:
    """The sections of one scanned model."""
    state = outcome.outcome if outcome is not None else report.verdict
    why = outcome.reason if outcome is not None else report.verdict_reason
    extra = []
    if report.evidence:
        extra.append(["evidence", json.dumps(report.evidence)])
    if outcome is not None and outcome.settings:
        extra.append(["settings", "; ".join(f"{k} = {v['value']} ({v['source']})"
                                            for k, v in outcome.settings.items())])
    out = [f'<div class="card">{badge(state)} <b>Why:</b> {esc(why)}</div>', _notes(report.extra.get("notes")),
           "<h2>Provenance</h2>",
           provenance(report.model, report.provider, report.preprocess, report.calibration, extra),
           _maps_section(report)]
    if "synthesis" in report.extra:
        out.append(synthesis_section(report.extra["synthesis"], report.visuals.triggers if report.visuals else ()))
    return "".join(out)


def clamp_body(report: ClampReport) -> str:
    """What was bounded, the bounds' headroom, verification and ACC / ASR."""
    cfg = report.config
    v = report.verification
    checks = "" if v is None else ", ".join(f"{k}: {val}" for k, val in v.get("checks", {}).items())
    summary = (f"{len(report.maps)} maps bounded ({cfg['granularity']} granularity, quantile {cfg['quantile']:g}, "
               f"margin {cfg['margin']:g}); calibration predictions unchanged: "
               f"{100 * report.calibration_agreement:.1f}%.")
    out = [f'<div class="card">{badge("written" if report.output else "verified")} {esc(summary)}'
           + (f"<br>Verified: {esc(checks)}" if checks else "")
           + (f"<br>Written to <code>{esc(report.output)}</code>" if report.output else "") + "</div>",
           _notes(report.notes), "<h2>Provenance</h2>",
           provenance(report.model, report.provider, report.preprocess, report.calibration,
                      [["clamp options", json.dumps(cfg)]]),
           "<h2>What was bounded</h2>",
           table(["map", "granularity", "bounds per side", "two-sided", "mean τ", "max τ", "min lower bound"],
                 [[m.tap, m.granularity, m.elements, "yes" if m.two_sided else "", f"{m.hi_mean:.4g}",
                   f"{m.hi_max:.4g}", "" if m.lo_min is None else f"{m.lo_min:.4g}"] for m in report.maps],
                 numeric=(2, 4, 5, 6))]
    out.append(_gate_section((report.strength or {}).get("gate")))
    if report.visuals is not None and report.visuals.bounds:
        out.append("<h2>Bound headroom</h2><p>Left: each map's mean and largest upper bound. Right: how far the "
                   "position bounds sit under the largest bound of their channel; a patch trigger that lifts one "
                   "position is cut where its bound is low.</p>")
        out.append(img(plots.bounds_figure(report.maps, report.visuals.bounds), "clamp bound headroom"))
    ev = report.evaluation
    if ev:
        out.append("<h2>Clean accuracy and attack success</h2>")
        pct = lambda v, f=".1f": "" if v is None else f"{100 * v:{f}}%"  # noqa: E731
        out.append(table(["model", "images", "clean ACC", "ASR", "triggered, true class"], [
            [name, e["images"], pct(e["accuracy"], ".2f"), pct(e.get("asr")), pct(e.get("triggered_accuracy"))]
            for name, e in (("original", ev["before"]), ("clamped", ev["after"]))], numeric=(1, 2, 3, 4)))
    return "".join(out)


def _gate_section(gate: dict | None) -> str:
    """The score gate: kept or why not, its alarm and threshold, what it does to a flagged input."""
    if gate is None:
        return ""
    if not gate.get("kept"):
        return f"<h2>Score gate</h2><p>Left out: {esc(gate.get('reason', ''))}</p>"
    suspects = gate.get("suspects") or {}
    probes = suspects.get("probes") or {}
    rows = [["alarm (clean images flagged, at most)", f"{100 * gate['alarm']:g}%"],
            ["threshold", f"{gate['threshold']:.4g}"],
            ["flagged input", "kept from the suspected classes only" if gate.get("response") == "exclude"
             else "channel means bounded at their clean average"],
            ["suspected classes", ", ".join(map(str, suspects.get("classes", []))) or "none"],
            ["suspected by", suspects.get("source", "not looked for")]]
    if probes:
        rows.append(["probe forwards", f"{probes['queries']} ({probes['seconds']:.1f} s)"])
    return "<h2>Score gate</h2>" + table(None, rows)


def synthesis_body(report: SynthesisReport) -> str:
    """Verdict, provenance and the synthesis section."""
    s = report.synthesis
    state = "suspected" if s["suspected"] else "clean"
    top = max(s["classes"], key=lambda c: c["anomaly"], default=None)
    why = (f"class(es) {', '.join(map(str, s['suspected']))} reached by an anomalously small trigger" if s["suspected"]
           else "no class's synthesized trigger is anomalously small")
    if top is not None:
        why += f" (largest anomaly index {top['anomaly']:.2f}, class {top['target']}; threshold {s['threshold']:g})"
    return "".join([f'<div class="card">{badge(state)} <b>Why:</b> {esc(why)}</div>', "<h2>Provenance</h2>",
                    provenance(report.model, None, report.preprocess, report.calibration),
                    synthesis_section(s, report.visuals.triggers if report.visuals else ())])


def many_body(report: ScanManyReport) -> str:
    """Summary table of a many-model scan, then each scanned model."""
    rows = [[Raw(badge(m.outcome)), Raw(f"<code>{esc(m.path)}</code>"), m.reason, (m.sha256 or "?")[:12]]
            for m in report.models]
    out = [f'<div class="card">{len(report.models)} models in <code>{esc(report.root)}</code> ({esc(report.layout)}): '
           f"{len(report.scanned)} scanned, {len(report.skipped)} could not be scanned. Exit code "
           f"{report.exit_code}.</div>", table(["result", "model", "why", "sha256"], rows)]
    for m in report.scanned:
        out.append(f"<h2 style=\"border:0;margin-top:40px\">{esc(m.path)}</h2>{scan_body(m.report, m)}")
    return "".join(out)


def html_report(report) -> str:
    """The HTML document of a scan, clamp, synthesis or many-model scan report.

    Raises:
        UsageError: matplotlib is missing.
        TypeError: not a report this module knows.
    """
    plots.pyplot()  # fail with the install hint before building anything
    if isinstance(report, ScanManyReport):
        title, body = f"onnx-linf scan: {report.root}", many_body(report)
    elif isinstance(report, ModelOutcome) and report.report is not None:
        title, body = f"onnx-linf scan: {report.path}", scan_body(report.report, report)
    elif isinstance(report, ScanReport):
        title, body = f"onnx-linf scan: {report.model.path}", scan_body(report)
    elif isinstance(report, ClampReport):
        title, body = f"onnx-linf clamp: {report.model.path}", clamp_body(report)
    elif isinstance(report, SynthesisReport):
        title, body = f"onnx-linf synthesize: {report.model.path}", synthesis_body(report)
    else:
        raise TypeError(f"no HTML report for {type(report).__name__}")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{esc(title)}</h1><div class=\"sub\">onnx-linf {__version__} · {stamp}</div>{body}"
            f"<footer>Self-contained report: no scripts, no network; figures are inline PNG images.</footer>"
            f"</main></body></html>\n")
