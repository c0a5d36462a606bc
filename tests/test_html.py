"""HTML report: one self-contained file (no script, no network), the sections and figures each report needs."""

from __future__ import annotations

import base64
import io
import json
import re
import sys

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from onnx_linf import Evidence, ScanConfig, scan
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
    # One clean-vs-evidence figure per map, and one heatmap figure per map the heatmaps show.
    assert doc.count("<img") == len(report.taps) + len(report.visuals.heatmaps.maps)
    assert "clean against suspect images (the first ones)" in doc


def test_scan_html_heatmaps_with_a_trigger():
    fx = reports.FIXTURES
    report = scan(fx / "digits_badnets.onnx", reports.CALIB, ScanConfig(limit=32, provider="cpu", heatmap_images=4),
                  evidence=Evidence(trigger=fx / "digits_badnets_trigger.png", mask=fx / "digits_badnets_mask.png"))
    heat = report.visuals.heatmaps
    assert heat.evidence_label == "trigger-stamped" and [m.why for m in heat.maps] == ["most flagged evidence",
                                                                                       "last map"]
    # The evidence images are the clean ones stamped: equal outside the trigger's corner, not inside.
    assert np.array_equal(heat.clean_pixels[:, :11, :11], heat.evidence_pixels[:, :11, :11])
    assert not np.array_equal(heat.clean_pixels, heat.evidence_pixels)
    for m in heat.maps:
        assert m.evidence.shape == m.clean.shape and m.clean.shape[:2] == (4, len(m.channels))
    # A flagged channel of the last map fires harder on the stamped images.
    assert heat.maps[-1].evidence[:, 0].max() > heat.maps[-1].clean[:, 0].max()
    doc = html_report(report)
    assert_self_contained(doc)
    section = doc[doc.index("<h3>Activation heatmaps of the flagged channels</h3>"):]
    assert "clean against trigger-stamped (the same images)" in section
    figures = re.findall(r'<img class="fig" alt="activation heatmaps of ([^"]+)" src="data:image/png;base64,([^"]+)"',
                         section)
    assert [f[0].split(" channels ")[0] for f in figures] == [m.tap for m in heat.maps]
    for _, data in figures:
        picture = Image.open(io.BytesIO(base64.b64decode(data)))
        assert picture.format == "PNG" and picture.width > 600
    assert "heatmaps" not in json.dumps(report.to_dict())


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


def test_cli_scan_report_has_heatmaps_and_plain_scan_skips_them(tmp_path):
    """Heatmaps cost one more ORT session: `scan --report` asks for them, a scan without it does not."""
    fx = reports.FIXTURES
    base = ["scan", str(fx / "digits_badnets.onnx"), "--calib", str(reports.CALIB), "--limit", "16",
            "--provider", "cpu", "-q"]
    result = CliRunner().invoke(app, [*base, "--report", str(tmp_path / "s.html")])
    assert result.exit_code == 0, result.stderr
    assert "Activation heatmaps of the flagged channels" in (tmp_path / "s.html").read_text()
    plain = scan(fx / "digits_badnets.onnx", reports.CALIB, ScanConfig(limit=16, provider="cpu"))
    assert plain.visuals is None or plain.visuals.heatmaps is None


def test_clamp_report_states_the_gate_and_its_suspects(tmp_path):
    fx = reports.FIXTURES
    args = ["clamp", str(fx / "digits_blended.onnx"), "--calib", str(fx / "digits_calib"), "--provider", "cpu",
            "-o", str(tmp_path / "safe.onnx"), "-q", "--report", str(tmp_path / "c.html"),
            "--eval-data", str(fx / "digits_test.npz"), "--trigger", str(fx / "digits_blended_trigger.png"),
            "--mask", str(fx / "digits_blended_mask.png"), "--target", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    doc = (tmp_path / "c.html").read_text()
    assert_self_contained(doc)
    gate = doc[doc.index("<h2>Score gate</h2>"):]
    assert "kept from the suspected classes only" in gate and "<th>suspected classes</th><td>0</td>" in gate
    assert "<th>suspected by</th><td>probes</td>" in gate and "probe forwards" in gate
    assert "triggered, true class" in doc
