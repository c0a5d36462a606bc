"""Report JSON: round trip, schema fields, and the suspect-exceedance section."""

from __future__ import annotations

import json

import numpy as np

from onnx_linf.commands.evidence import Evidence
from onnx_linf.commands.options import ScanConfig
from onnx_linf.commands.scan import scan
from onnx_linf.measure.preprocess import Preprocess, Trigger
from onnx_linf.report.reader import load_report
from onnx_linf.report.types import SCHEMA_VERSION, ScanReport


def test_report_round_trips(fixtures_dir, tmp_path):
    report = scan(fixtures_dir / "digits_clean.onnx", fixtures_dir / "digits_calib",
                  ScanConfig(limit=40, provider="cpu"))
    path = tmp_path / "r.json"
    path.write_text(report.to_json())
    again = load_report(path)
    assert again.to_dict() == report.to_dict()
    assert isinstance(again, ScanReport) and again.schema_version == SCHEMA_VERSION
    data = json.loads(path.read_text())
    for key in ("schema_version", "tool_version", "provider", "preprocess", "taps", "verdict"):
        assert key in data
    assert len(data["model"]["sha256"]) == 64


def test_scan_suspect_reports_bound_exceedance(fixtures_dir, tmp_path):
    """Triggered suspects leave the clean range much further than clean held-out images do."""
    pp = Preprocess((16, 16), channels="L")
    test = np.load(fixtures_dir / "digits_test.npz")["x"][:60]
    trig = Trigger.from_files(fixtures_dir / "digits_badnets_trigger.png", fixtures_dir / "digits_badnets_mask.png", pp)
    np.savez(tmp_path / "suspect.npz", x=trig.stamp(test))
    np.savez(tmp_path / "clean.npz", x=test)
    model, calib = fixtures_dir / "digits_badnets.onnx", fixtures_dir / "digits_calib"
    sus = scan(model, calib, ScanConfig(provider="cpu"), evidence=Evidence(suspect=tmp_path / "suspect.npz"))
    cln = scan(model, calib, ScanConfig(provider="cpu"), evidence=Evidence(suspect=tmp_path / "clean.npz"))
    s, c = sus.extra["bounds_exceedance"], cln.extra["bounds_exceedance"]
    assert set(s) == {"relu1_out", "relu2_out", "relu3_out"} and s["relu3_out"]["images"] == 60
    for tap in s:
        assert s[tap]["mean_relative_excess"] > 5 * c[tap]["mean_relative_excess"]
    # The clamp's per-image anomaly score, against the clean maxima: triggered suspects score far
    # above held-out clean images (which may leave the clean envelope a little: they are new data).
    a, b = sus.extra["anomaly_score"], cln.extra["anomaly_score"]
    assert a["images"] == b["images"] == 60
    assert a["above_floor"] == 1.0 and a["median"] > 5 * b["median"]


def test_report_rejects_foreign_json(tmp_path):
    import pytest

    from onnx_linf.errors import CalibrationDataError

    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(CalibrationDataError, match="is not an onnx-linf report"):
        load_report(tmp_path / "x.json")
