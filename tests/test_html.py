"""HTML report: one self-contained file (no script, no network), the sections and figures each report needs."""

from __future__ import annotations

import re
import sys

from typer.testing import CliRunner

from onnx_linf.cli.app import app
from onnx_linf.report.html import html_report

import reports


def assert_self_contained(doc: str) -> None:
    assert doc.startswith("<!DOCTYPE html>")
    assert "<script" not in doc.lower()
    # Every src/href is inline data; nothing is fetched.
    refs = re.findall(r'(?:src|href)="([^"]*)"', doc)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    assert "url(" not in doc and "@import" not in doc


def test_scan_html_with_suspects(tmp_path):
    report = reports.suspect_scan(str(tmp_path))
    doc = html_report(report)
    assert_self_contained(doc)
    for text in ("Provenance", report.model.sha256, "CPUExecutionProvider", "model metadata",
                 "Suspect images against the clean per-position range", "not assessed"):
        assert text in doc
    assert doc.count("<img") == len(report.taps)  # one clean-vs-evidence figure per map


def test_cli_report_on_clamp_and_missing_matplotlib(tmp_path, monkeypatch):
    fx = reports.FIXTURES
    args = ["clamp", str(fx / "digits_badnets.onnx"), "--calib", str(reports.CALIB), "--limit", "32",
            "--provider", "cpu", "-o", str(tmp_path / "safe.onnx"), "-q", "--report", str(tmp_path / "c.html")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    doc = (tmp_path / "c.html").read_text()
    assert_self_contained(doc)
    assert "Bound headroom" in doc and "What was bounded" in doc and "verified and written" in doc
    # Without matplotlib: one line, exit 2, before any work, and no file written.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    args[args.index("-o") + 1] = str(tmp_path / "other.onnx")
    args[-1] = str(tmp_path / "none.html")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: the HTML report needs matplotlib: pip install 'onnx-linf[report]'")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "none.html").exists() and not (tmp_path / "other.onnx").exists()
