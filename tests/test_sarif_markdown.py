"""SARIF and Markdown writers: schema-valid SARIF with stable rules and fingerprints, summary tables."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

from typer.testing import CliRunner

from onnx_linf.cli.app import app
from onnx_linf.commands.gate import AllowEntry, judge, unscannable
from onnx_linf.errors import ModelLoadError
from onnx_linf.report.many import ScanManyReport, worst_exit_code
from onnx_linf.report.markdown import markdown_summary, outcomes_markdown
from onnx_linf.report.sarif import RULES, sarif_log

import reports
from reports import validate

TODAY = dt.date(2026, 6, 1)


def suspected(report):
    """The same report with the verdict trigger synthesis gives a backdoored model (writer input only)."""
    return dataclasses.replace(report, verdict="suspected", verdict_reason="class 0 is reached by an unusually "
                               "small synthesized trigger (mask L1 8.2, anomaly index 5.1 > 3.5)")


def test_sarif_validates_and_maps_outcomes_to_rules(tmp_path):
    clean_model = reports.plain_scan("digits_clean")
    bad = reports.suspect_scan(str(tmp_path))
    broken = reports.FIXTURES / "broken" / "not_onnx.onnx"
    outcomes = [
        judge(clean_model, fail_on_suspect=True),
        judge(suspected(bad), fail_on_suspect=True),
        unscannable(broken, ModelLoadError("not a valid ONNX model")),
    ]
    log = sarif_log(outcomes, base=reports.FIXTURES.parent)
    validate(log)
    run = log["runs"][0]
    assert [r["id"] for r in run["tool"]["driver"]["rules"]] == [r["id"] for r in RULES.values()]
    got = [(r["ruleId"], r["level"], r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"])
           for r in run["results"]]
    assert got == [
        ("OLINF005", "note", "fixtures/digits_clean.onnx"),
        ("OLINF001", "error", "fixtures/digits_badnets.onnx"),
        ("OLINF002", "warning", "fixtures/digits_badnets.onnx"),  # stamped suspects leave the clean range
        ("OLINF003", "error", "fixtures/broken/not_onnx.onnx"),
    ]
    assert outcomes[1].exit_code == 1 and outcomes[2].exit_code == 2
    # Fingerprints: one per (model, rule), identical on a second run, different across models.
    again = sarif_log(outcomes, base=reports.FIXTURES.parent)["runs"][0]["results"]
    prints = [r["partialFingerprints"] for r in run["results"]]
    assert prints == [r["partialFingerprints"] for r in again]
    assert len({json.dumps(p) for p in prints}) == 4
    assert "ModelLoadError" in run["results"][3]["message"]["text"]


def test_allowlist_suppresses_and_expiry_fails():
    bad = suspected(reports.plain_scan())
    entry = AllowEntry(bad.model.sha256, "reviewed: fixture model", dt.date(2026, 12, 31))
    ok = judge(bad, allowlist=(entry,), fail_on_suspect=True, today=TODAY)
    assert ok.outcome == "allowlisted" and ok.exit_code == 0
    expired = judge(bad, allowlist=(entry,), fail_on_suspect=True, today=dt.date(2027, 1, 1))
    assert expired.outcome == "allowlist-expired" and expired.exit_code == 1
    log = sarif_log([ok, expired])
    validate(log)
    results = log["runs"][0]["results"]
    assert results[0]["ruleId"] == "OLINF001" and results[0]["suppressions"][0]["status"] == "accepted"
    assert [r["ruleId"] for r in results[1:]] == ["OLINF004", "OLINF001"]
    assert "suppressions" not in results[2]


def test_markdown_rows_verdict_first():
    outcomes = [judge(reports.plain_scan("digits_clean")), judge(suspected(reports.plain_scan())),
                unscannable(reports.FIXTURES / "broken" / "truncated.onnx", ModelLoadError("truncated | bad"))]
    text = outcomes_markdown(outcomes)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == 3
    assert rows[0].startswith("| ➖ not assessed | `") and "digits_clean.onnx" in rows[0]
    assert rows[1].startswith("| ❌ **suspected** |")
    assert rows[2].startswith("| ❌ **not scanned** |") and "truncated \\| bad" in rows[2]
    assert all(row.count(" | ") == 6 for row in rows)  # 7 cells, escaped pipes not counted
    assert markdown_summary(reports.plain_scan()).startswith("### onnx-linf scan")


def test_cli_scan_writes_sarif_summary_and_step_summary(tmp_path, monkeypatch):
    step = tmp_path / "step.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    result = CliRunner().invoke(app, [
        "scan", str(reports.FIXTURES / "digits_badnets.onnx"), "--calib", str(reports.CALIB), "--limit", "16",
        "--provider", "cpu", "-q", "--sarif", str(tmp_path / "scan.sarif"), "--summary", str(tmp_path / "s.md")])
    assert result.exit_code == 0, result.stderr
    log = json.loads((tmp_path / "scan.sarif").read_text())
    validate(log)
    assert [r["ruleId"] for r in log["runs"][0]["results"]] == ["OLINF005"]
    summary = (tmp_path / "s.md").read_text()
    assert "not assessed" in summary and "digits_badnets.onnx" in summary
    assert step.read_text() == "earlier step\n" + summary + "\n"  # appended, not replaced


def test_cli_scan_bad_output_folder_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, [
        "scan", str(reports.FIXTURES / "digits_badnets.onnx"), "--calib", str(reports.CALIB),
        "--sarif", str(tmp_path / "missing" / "scan.sarif")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: output folder does not exist")
    assert "Traceback" not in result.stderr


def test_invalid_statistics_fail_closed_in_a_many_model_report():
    """A scan whose statistics are non-finite is not a scan: exit 2 and listed as skipped, never clean."""
    clean = judge(reports.plain_scan("digits_clean"))
    invalid = judge(dataclasses.replace(reports.plain_scan(), verdict="invalid",
                                        verdict_reason="relu3_out: 2 channels have non-finite linf"))
    assert invalid.outcome == "unscannable" and not invalid.scanned
    report = ScanManyReport(root="models", layout="folder", models=[clean, invalid], skip_unscannable=False,
                            exit_code=worst_exit_code([clean, invalid], False))
    assert report.exit_code == 2 and worst_exit_code([clean, invalid], True) == 0
    doc = report.to_dict()
    assert [m["outcome"] for m in doc["skipped"]] == ["unscannable"] and "report" in doc["skipped"][0]
    results = sarif_log(report)["runs"][0]["results"]
    assert [r["ruleId"] for r in results] == ["OLINF005", "OLINF003"]
    assert results[1]["message"]["text"].startswith("relu3_out: 2 channels have non-finite linf")
