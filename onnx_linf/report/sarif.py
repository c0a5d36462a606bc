"""SARIF 2.1.0 log of scan outcomes, for code-scanning dashboards (GitHub code scanning and others).

One run; ``tool.driver`` lists every rule with a stable id, whether or not it fired, so a dashboard
can close an alert when a later upload no longer has it. One result per finding, located at the
model file. ``partialFingerprints`` hash the model's sha256 with the rule id: re-uploading the same
model gives the same fingerprint (no duplicate alert), a changed model a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

from .. import __version__
from .many import ModelOutcome, ScanManyReport

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
INFORMATION_URI = "https://pypi.org/project/onnx-linf/"
#: A map counts as left when at least this fraction of suspect images leave its clean per-position range.
EXCEEDANCE_FRACTION = 0.5
#: Key of our fingerprint in ``partialFingerprints`` (versioned: change it if the hashed input changes).
FINGERPRINT_KEY = "onnxLinfModelRule/v1"

#: Stable rule ids; never renumber, only add.
RULES = {
    "backdoor-suspected": dict(
        id="OLINF001", level="error", severity="8.0",
        short="Backdoor suspected",
        full="An evidence family suspects a class of the model: it is reached by an anomalously small "
             "synthesized trigger (Neural Cleanse anomaly index above the threshold, the signature of a patch "
             "backdoor), or whole-image noise blends or one grating orientation send most images to it "
             "(scan --verdict, the signature of a full-image trigger).",
        help="Do not deploy the model as it is. Sanitise it (onnx-linf clamp MODEL --calib DATA -o safe.onnx), "
             "measure ACC and ASR with onnx-linf evaluate, or obtain the model from a trusted source."),
    "activations-exceed-clean-bounds": dict(
        id="OLINF002", level="warning", severity="6.0",
        short="Activations exceed clean bounds",
        full="Most of the suspect images drive an activation map beyond the per-position range clean "
             "calibration images produce there: the clamp's view of trigger evidence.",
        help="Inspect the suspect images; onnx-linf clamp bounds every map to its clean range."),
    "not-scanned": dict(
        id="OLINF003", level="error", severity="7.0",
        short="Model could not be scanned",
        full="onnx-linf could not load or scan this model file, so nothing is known about it. A model "
             "that could not be scanned is never counted clean.",
        help="Fix the cause given in the message (invalid file, unsupported operator, missing external "
             "data, preprocessing), or remove the file."),
    "allowlist-expired": dict(
        id="OLINF004", level="error", severity="7.0",
        short="Allowlist entry expired",
        full="The model's sha256 is on the allowlist, but the entry's expiry date has passed.",
        help="Review the model again and renew or remove the allowlist entry."),
    "not-assessed": dict(
        id="OLINF005", level="note", severity="0.0",
        short="No backdoor verdict",
        full="The model was measured without trigger evidence, so the scan gives no backdoor verdict: the "
             "most active channels on clean images are not evidence of a backdoor.",
        help="Add --verdict (probe families and query-only trigger synthesis) to the scan for a verdict."),
}


def _rule_descriptor(name: str, rule: dict) -> dict:
    return {
        "id": rule["id"], "name": "".join(p.capitalize() for p in name.split("-")),
        "shortDescription": {"text": rule["short"]}, "fullDescription": {"text": rule["full"]},
        "help": {"text": rule["help"]}, "defaultConfiguration": {"level": rule["level"]},
        "properties": {"security-severity": rule["severity"], "tags": ["security", "ml-model", "backdoor"]},
    }


def _exceedance(outcome: ModelOutcome) -> str | None:
    ex = (outcome.report.extra.get("bounds_exceedance") or {}) if outcome.report is not None else {}
    left = {tap: v for tap, v in ex.items() if v["images_outside"] >= EXCEEDANCE_FRACTION}
    if not left:
        return None
    worst = max(left, key=lambda t: left[t]["images_outside"])
    v = left[worst]
    return (f"{len(left)} of {len(ex)} activation maps are left by at least {100 * EXCEEDANCE_FRACTION:.0f}% of the "
            f"suspect images; worst {worst}: {100 * v['images_outside']:.0f}% of {v['images']} images, largest "
            f"excess {v['max_relative_excess']:.2f}x the map's clean maximum")


def findings(outcome: ModelOutcome) -> list[tuple[str, str, list | None]]:
    """(rule name, message, suppressions) for every finding about one model."""
    out: list[tuple[str, str, list | None]] = []
    if outcome.outcome == "unscannable":
        out.append(("not-scanned", f"{outcome.error}: {outcome.reason}" if outcome.error else outcome.reason, None))
        return out
    if outcome.outcome == "allowlist-expired":
        out.append(("allowlist-expired", outcome.reason, None))
    report = outcome.report
    if report.verdict == "suspected":
        suppress = None
        if outcome.outcome == "allowlisted":
            a = outcome.allowlist
            suppress = [{"kind": "external", "status": "accepted",
                         "justification": f"{a['reason']} (allowlisted until {a['expires']})"}]
        out.append(("backdoor-suspected", report.verdict_reason, suppress))
    elif report.verdict == "not-assessed":
        out.append(("not-assessed", report.verdict_reason, None))
    message = _exceedance(outcome)
    if message is not None:
        out.append(("activations-exceed-clean-bounds", message, None))
    return out


def _artifact(path: str, base: Path) -> dict:
    p = Path(path)
    absolute = p if p.is_absolute() else (Path.cwd() / p)
    try:
        rel = os.path.relpath(absolute.resolve(), base.resolve())
    except ValueError:  # another drive on Windows
        rel = None
    if rel is None or rel.startswith(".."):
        return {"uri": absolute.resolve().as_uri()}
    return {"uri": PurePosixPath(*Path(rel).parts).as_posix(), "uriBaseId": "SRCROOT"}


def fingerprint(sha256: str | None, rule_id: str, path: str) -> str:
    """Stable across uploads of the same model for the same rule (the path stands in when unreadable)."""
    return hashlib.sha256(f"{sha256 or 'unreadable:' + path}:{rule_id}".encode()).hexdigest()


def sarif_log(outcomes: list[ModelOutcome] | ScanManyReport, base: str | os.PathLike | None = None) -> dict:
    """The SARIF 2.1.0 log (as a dictionary) of a scan of one or many models.

    Args:
        outcomes: the gate's outcome per model, or a many-model report.
        base: folder result paths are relative to (default: the working directory); in CI, the
            repository root, so that code scanning finds the files.
    """
    if isinstance(outcomes, ScanManyReport):
        outcomes = outcomes.models
    base = Path(base) if base is not None else Path.cwd()
    names = list(RULES)
    results = []
    for m in outcomes:
        for name, message, suppressions in findings(m):
            rule = RULES[name]
            result = {
                "ruleId": rule["id"], "ruleIndex": names.index(name), "level": rule["level"],
                "message": {"text": message},
                "locations": [{"physicalLocation": {"artifactLocation": _artifact(m.path, base),
                                                    # Code scanning needs a line to show an alert;
                                                    # a model file has none, so the first.
                                                    "region": {"startLine": 1}}}],
                "partialFingerprints": {FINGERPRINT_KEY: fingerprint(m.sha256, rule["id"], m.path)},
                "properties": {"outcome": m.outcome, "sha256": m.sha256, "exitCode": m.exit_code},
            }
            if suppressions:
                result["suppressions"] = suppressions
            results.append(result)
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "onnx-linf", "version": __version__, "semanticVersion": __version__,
                                "informationUri": INFORMATION_URI,
                                "rules": [_rule_descriptor(n, RULES[n]) for n in names]}},
            "originalUriBaseIds": {"SRCROOT": {"uri": base.resolve().as_uri().rstrip("/") + "/"}},
            "results": results,
            "columnKind": "unicodeCodePoints",
        }],
    }


def sarif_json(outcomes: list[ModelOutcome] | ScanManyReport, base: str | os.PathLike | None = None) -> str:
    """`sarif_log` as JSON text."""
    return json.dumps(sarif_log(outcomes, base), indent=2, allow_nan=False)
