"""The HTML reports in a real headless browser (Debian's chromium): they load from file with no console
errors and render their figures. Skipped where no chromium is installed (.ci/run installs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnx_linf import ClampConfig, clamp
from onnx_linf.commands.synthesize import synthesize_model
from onnx_linf.decide.synthesis.results import SynthConfig
from onnx_linf.report.html import html_report

import reports

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="chromium is not installed (apt-get install chromium)")
#: Console messages chromium logs with --enable-logging=stderr; uncaught exceptions and console.error.
CONSOLE_ERRORS = ("Uncaught", "ERROR:CONSOLE", ":CONSOLE(")


def browse(page: Path, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--window-size=1200,2200", *mode, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(key in line for key in CONSOLE_ERRORS)]


def render(doc: str, name: str, tmp_path: Path) -> tuple[str, Image.Image]:
    """Load a report in the browser twice: the DOM it built, and a screenshot; no console errors either time."""
    page = tmp_path / f"{name}.html"
    page.write_text(doc)
    dom = browse(page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not console_errors(dom.stderr), console_errors(dom.stderr)
    shot = tmp_path / f"{name}.png"
    done = browse(page, tmp_path / "profile", f"--screenshot={shot}")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    assert not console_errors(done.stderr), console_errors(done.stderr)
    keep = os.environ.get("ONNX_LINF_SCREENSHOTS")  # to look at them
    if keep:
        shutil.copy(shot, Path(keep) / shot.name)
    return dom.stdout, Image.open(shot).convert("RGB")


def assert_figures_drawn(dom: str, image: Image.Image, figures: int) -> None:
    assert dom.count("<img") >= figures and "data:image/png;base64," in dom
    px = np.asarray(image, dtype=np.float32)
    assert image.size == (1200, 2200)
    # Figures put dark axes and coloured bars on the light page: many distinct, saturated pixels.
    saturation = px.max(axis=2) - px.min(axis=2)
    assert (saturation > 60).mean() > 0.002 and (px.mean(axis=2) < 80).mean() > 0.002


def test_console_error_detection_works(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    result = browse(page, tmp_path / "profile", "--dump-dom")
    assert console_errors(result.stderr), result.stderr[-2000:]


def test_scan_report_renders(tmp_path):
    report = reports.suspect_scan(str(tmp_path))
    dom, image = render(html_report(report), "scan", tmp_path)
    assert "Per-channel" in dom and report.model.sha256 in dom and "Activation heatmaps" in dom
    assert_figures_drawn(dom, image, len(report.taps))


def test_clamp_report_renders(tmp_path):
    result = clamp(reports.FIXTURES / "digits_badnets.onnx", reports.CALIB, ClampConfig(limit=32, provider="cpu"))
    dom, image = render(html_report(result.report), "clamp", tmp_path)
    assert "Bound headroom" in dom
    assert_figures_drawn(dom, image, 1)


def test_synthesis_report_renders(tmp_path):
    done = synthesize_model(reports.FIXTURES / "digits_badnets.onnx", reports.CALIB,
                            SynthConfig(classes=(0, 1, 2), steps=3, images=64), provider="cpu")
    dom, image = render(html_report(done.report), "synthesis", tmp_path)
    assert "Trigger synthesis" in dom
    assert_figures_drawn(dom, image, 1 + 2 * 3)  # the chart, then trigger and mask per class
