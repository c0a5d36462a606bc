"""Quantized graphs: scanned on ORT's float path with a note; never rewritten; clear errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
from typer.testing import CliRunner

from onnx_linf.cli.app import app
from onnx_linf.cli.exit_codes import ExitCode

import models

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def calib(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    return path


def test_qdq_model_scans_with_a_note(tmp_path):
    path = tmp_path / "qdq.onnx"
    onnx.save(models.qdq_cnn(), path)
    result = invoke("scan", path, "--calib", calib(tmp_path), "--json", "-", "-q", "--provider", "cpu")
    assert result.exit_code == ExitCode.OK, result.stderr
    report = json.loads(result.stdout)
    assert [(t["name"], t["kind"]) for t in report["taps"]] == [("r1_out", "conv"), ("a_dq_out", "head")]
    assert report["taps"][0]["stats"]["linf"]["max"][0] > 0
    assert "quantized model (DequantizeLinear, QuantizeLinear)" in report["extra"]["notes"][0]
    shown = invoke("scan", path, "--calib", calib(tmp_path), "--provider", "cpu")
    assert shown.exit_code == ExitCode.OK and "note quantized model" in shown.stderr


def test_qdq_model_is_never_rewritten(tmp_path):
    path = tmp_path / "qdq.onnx"
    onnx.save(models.qdq_cnn(), path)
    for command in (["clamp"], ["prune", "--evidence", "none"]):
        out = tmp_path / f"{command[0]}.onnx"
        result = invoke(*command, path, "--calib", calib(tmp_path), "-o", out, "--provider", "cpu")
        assert result.exit_code == ExitCode.INPUT_ERROR, (command, result.stderr)
        assert "is quantized (DequantizeLinear, QuantizeLinear): onnx-linf rewrites float models" in result.stderr
        assert "clamp or prune the float model, then quantize the result" in result.stderr
        assert "Traceback" not in result.stderr and not out.exists()


def test_qoperator_model_has_nothing_to_scan(tmp_path):
    path = tmp_path / "qlinear.onnx"
    onnx.save(models.qlinear_cnn(), path)
    result = invoke("scan", path, "--calib", calib(tmp_path))
    assert result.exit_code == ExitCode.NOTHING_TO_SCAN
    assert "it is quantized (DequantizeLinear, QLinearConv, QuantizeLinear); scan the float model" in result.stderr
