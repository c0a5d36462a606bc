"""Markdown summary of a report: a short table per model, verdict first (CI step summaries, PR comments).

Written from the report objects alone; nothing is measured here.
"""

from __future__ import annotations

from collections.abc import Sequence

from .many import ModelOutcome, ScanManyReport
from .types import ClampReport, EvaluationReport, ScanReport, SynthesisReport

#: Outcome -> what the summary shows first.
BADGES = {
    "clean": "✅ clean",
    "suspected": "❌ **suspected**",
    "not-assessed": "➖ not assessed",
    "allowlisted": "⚠️ suspected, allowlisted",
    "allowlist-expired": "❌ **allowlist entry expired**",
    "unscannable": "❌ **not scanned**",
}


def cell(value) -> str:
    """A table cell: pipes escaped, newlines flattened."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def _flagged(report: ScanReport) -> str:
    total = sum(len(t.flagged) for t in report.taps)
    what = "evidence-ranked" if report.policy.get("evidence") else "most active on clean images"
    return f"{total} in {sum(1 for t in report.taps if t.flagged)} maps ({what})"


def _suspected_classes(synthesis: dict | None, families: list[dict] | None = None) -> str:
    if families:  # scan --verdict: any family's suspected class, with the families that suspect it
        by_class: dict[int, list[str]] = {}
        for f in families:
            if f["suspected"]:
                by_class.setdefault(f["target"], []).append(f["family"])
        return ", ".join(f"{k} ({', '.join(v)})" for k, v in by_class.items()) or "none"
    if not synthesis:
        return ""
    return ", ".join(map(str, synthesis["suspected"])) or "none"


def _datafree_target(datafree: dict) -> str:
    if datafree["verdict"] != "suspected":
        return "none (data-free)"
    return "unknown (data-free)" if datafree["target"] is None else f"{datafree['target']} (data-free)"


def outcomes_markdown(outcomes: Sequence[ModelOutcome], title: str = "onnx-linf scan",
                      footer: str | None = None) -> str:
    """One row per model: outcome, model, why, sha256, maps, flagged channels, suspected classes."""
    rows = []
    for m in outcomes:
        r = m.report
        rows.append([
            BADGES.get(m.outcome, m.outcome), f"`{m.path}`", m.reason,
            (m.sha256 or "?")[:12],
            "" if r is None else len(r.taps),
            "" if r is None else "data-free: no maps measured" if "datafree" in r.extra else _flagged(r),
            "" if r is None else _datafree_target(r.extra["datafree"]) if "datafree" in r.extra
            else _suspected_classes(r.extra.get("synthesis"), r.extra.get("evidence_families")),
        ])
    lines = [f"### {title}", ""]
    lines += _table(["result", "model", "why", "sha256", "maps", "flagged channels", "suspected classes"], rows)
    if footer:
        lines += ["", footer]
    return "\n".join(lines) + "\n"


def many_markdown(report: ScanManyReport) -> str:
    """The table of a many-model scan, with counts and the exit code under it."""
    skipped = len(report.skipped)
    foot = (f"{len(report.models)} models found in `{report.root}` ({report.layout}): {len(report.scanned)} "
            f"scanned, {skipped} could not be scanned"
            + (" (skipped: --skip-unscannable)" if skipped and report.skip_unscannable else "")
            + f". Exit code {report.exit_code}.")
    return outcomes_markdown(report.models, footer=foot)


def scan_markdown(report: ScanReport) -> str:
    """A single scan report, without the gate (its verdict as the outcome)."""
    m = ModelOutcome(path=report.model.path, outcome=report.verdict, reason=report.verdict_reason, exit_code=0,
                     sha256=report.model.sha256, report=report)
    return outcomes_markdown([m])


def clamp_markdown(report: ClampReport) -> str:
    """What the clamp bounded, whether it verified, and ACC / ASR before and after when measured."""
    cfg = report.config
    verified = "identity on calibration images" if report.verification else "not an identity (quantile < 100)"
    row = ["✅ written" if report.output else "✅ done", f"`{report.model.path}`",
           f"`{report.output}`" if report.output else "", len(report.maps),
           f"{cfg['granularity']}, q = {cfg['quantile']:g}, margin {cfg['margin']:g}", verified,
           f"{100 * report.calibration_agreement:.1f}%"]
    header = ["result", "model", "output", "maps bounded", "bounds", "verification", "predictions unchanged"]
    lines = ["### onnx-linf clamp", ""] + _table(header, [row])
    gate = (report.strength or {}).get("gate")
    if gate is not None and gate["kept"]:
        named = f"; the output `{gate['output']}` names the images it flags" if gate.get("output") else ""
        suspects = gate.get("suspects") or {}
        never = (f" A flagged image is never given class {', '.join(map(str, suspects['classes']))} (suspected: "
                 f"{suspects['source']})." if suspects.get("classes") else "")
        lines += ["", f"Score gate: at most {100 * gate['alarm']:g}% of clean images flagged "
                      f"({100 * gate['confidence']:.0f}% confidence), threshold {gate['threshold']:.3g}{named}.{never}"]
    ev = report.evaluation
    if ev:
        pct = lambda v, f=".1f": "" if v is None else f"{100 * v:{f}}%"  # noqa: E731
        refusing = ev["after"].get("refused") is not None
        header = ["model", "clean ACC", "ASR"] + (["refused clean / triggered", "refusing: accepted and correct",
                                                    "refusing: ASR"] if refusing else [])
        lines += [""] + _table(header, [
            [name, pct(e["accuracy"], ".2f"), pct(e.get("asr"))]
            + ([f"{pct(e.get('refused'))} / {pct(e.get('refused_triggered'))}" if e.get("refused") is not None
                else "", pct(e.get("accepted_correct"), ".2f"), pct(e.get("asr_accepted"))] if refusing else [])
            for name, e in (("original", ev["before"]), ("clamped", ev["after"]))])
    return "\n".join(lines) + "\n"


def synthesis_markdown(report: SynthesisReport) -> str:
    """Verdict, suspected classes and the per-class mask norms of a trigger synthesis."""
    s = report.synthesis
    found = [c for c in s["classes"] if c["found"]]
    top = max(s["classes"], key=lambda c: c["anomaly"], default=None)
    verdict = "❌ **suspected**" if s["suspected"] else "✅ clean"
    row = [verdict, f"`{report.model.path}`", _suspected_classes(s),
           "" if top is None else f"{top['anomaly']:.2f} (class {top['target']})", f"{s['threshold']:g}",
           f"{len(found)} of {len(s['classes'])}", s["queries"]]
    header = ["result", "model", "suspected classes", "largest anomaly index", "threshold", "triggers found",
              "queries"]
    lines = ["### onnx-linf synthesize", ""] + _table(header, [row])
    if not s["complete"]:
        lines += ["", "The query budget or time limit cut the search short: not every class was searched."]
    return "\n".join(lines) + "\n"


def evaluation_markdown(report: EvaluationReport) -> str:
    """Clean accuracy and attack success rate."""
    e = report.evaluation
    row = [f"`{report.model}`", f"{100 * e['accuracy']:.2f}%",
           "" if e.get("asr") is None else f"{100 * e['asr']:.1f}%", report.sha256[:12]]
    return "\n".join(["### onnx-linf evaluate", ""] + _table(["model", "clean ACC", "ASR", "sha256"], [row])) + "\n"


def markdown_summary(report) -> str:
    """The Markdown summary of any onnx-linf report (or of gate outcomes).

    Raises:
        TypeError: not a report this module knows.
    """
    if isinstance(report, ScanManyReport):
        return many_markdown(report)
    if isinstance(report, ModelOutcome):
        return outcomes_markdown([report])
    if isinstance(report, ScanReport):
        return scan_markdown(report)
    if isinstance(report, ClampReport):
        return clamp_markdown(report)
    if isinstance(report, SynthesisReport):
        return synthesis_markdown(report)
    if isinstance(report, EvaluationReport):
        return evaluation_markdown(report)
    raise TypeError(f"no Markdown summary for {type(report).__name__}")
