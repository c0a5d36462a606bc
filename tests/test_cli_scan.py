"""The scan and inspect commands: exit codes, one-line errors, JSON on stdout, golden report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from onnx_linf.cli.app import app
from onnx_linf.cli.exit_codes import ExitCode

import models
from golden import check_golden

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, code, message):
    assert result.exit_code == code, (result.exit_code, result.stderr, result.stdout)
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    assert result.stderr.startswith("error:")


def test_scan_fixture_json_stdout_only(fixtures_dir):
    result = invoke("scan", fixtures_dir / "digits_badnets.onnx", "--calib", fixtures_dir / "digits_calib",
                    "--json", "-", "--limit", "64", "--provider", "cpu")
    assert result.exit_code == ExitCode.OK, result.stderr
    report = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    assert report["schema_version"] == 1 and report["tool"] == "onnx-linf"
    assert [t["name"] for t in report["taps"]] == ["relu1_out", "relu2_out", "relu3_out"]
    assert report["calibration"]["images"] == 64
    assert report["verdict"] == "not-assessed"
    assert report["policy"]["evidence"] is False and report["policy"]["score"] == "clean linf"
    assert report["provider"] == "CPUExecutionProvider"
    # Human output went to stderr.
    assert "activation maps measured" in result.stderr


def test_scan_golden_report(fixtures_dir, tmp_path):
    out = tmp_path / "report.json"
    result = invoke("scan", fixtures_dir / "digits_badnets.onnx", "--calib", fixtures_dir / "digits_calib",
                    "--json", out, "--limit", "64", "--provider", "cpu", "--quiet")
    assert result.exit_code == 0, result.stderr
    check_golden("scan_digits_badnets.json", json.loads(out.read_text()))


def test_scan_with_trigger_ranks_by_differential(fixtures_dir):
    result = invoke("scan", fixtures_dir / "digits_badnets.onnx", "--calib", fixtures_dir / "digits_calib",
                    "--trigger", fixtures_dir / "digits_badnets_trigger.png",
                    "--mask", fixtures_dir / "digits_badnets_mask.png",
                    "--json", "-", "--limit", "64", "--layers", "last", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    tap = report["taps"][0]
    assert report["policy"]["score"] == "differential linf" and report["policy"]["evidence"] is True
    scores = np.array(tap["scores"])
    ev = np.array(tap["evidence_stats"]["linf"]["mean"]) - np.array(tap["stats"]["linf"]["mean"])
    np.testing.assert_allclose(scores, ev, rtol=1e-9)
    assert tap["flagged"][0] == int(np.argmax(scores))
    assert scores.max() > 1.0  # the patch drives some channel far above its clean range


def test_missing_model(tmp_path, fixtures_dir):
    assert_one_line_error(invoke("scan", tmp_path / "nope.onnx", "--calib", fixtures_dir / "digits_calib"),
                          ExitCode.INPUT_ERROR, "model file not found")


def test_not_onnx(fixtures_dir):
    assert_one_line_error(invoke("scan", fixtures_dir / "broken" / "not_onnx.onnx", "--calib",
                                 fixtures_dir / "digits_calib"), ExitCode.INPUT_ERROR, "not a valid ONNX model")


def test_no_conv_exits_3(fixtures_dir):
    assert_one_line_error(invoke("scan", fixtures_dir / "broken" / "no_conv.onnx", "--calib",
                                 fixtures_dir / "digits_calib"), ExitCode.NOTHING_TO_SCAN, "nothing to scan")


def test_empty_calibration_folder(fixtures_dir, tmp_path):
    assert_one_line_error(invoke("scan", fixtures_dir / "digits_clean.onnx", "--calib", tmp_path),
                          ExitCode.INPUT_ERROR, "no images found")


def test_unreadable_image(fixtures_dir, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    assert_one_line_error(invoke("scan", fixtures_dir / "digits_clean.onnx", "--calib", tmp_path),
                          ExitCode.INPUT_ERROR, "cannot read image")


@pytest.mark.parametrize("ratio", ["0", "1", "1.5"])
def test_bad_ratio(fixtures_dir, ratio):
    assert_one_line_error(invoke("scan", fixtures_dir / "digits_clean.onnx", "--calib",
                                 fixtures_dir / "digits_calib", "--ratio", ratio),
                          ExitCode.INPUT_ERROR, "--ratio must be in (0, 1)")


def test_dynamic_spatial_needs_size(model_file, pixels_file):
    path = model_file(models.dynamic_spatial())
    calib = pixels_file(6, 10, 10)
    assert_one_line_error(invoke("scan", path, "--calib", calib), ExitCode.INPUT_ERROR, "pass --size HxW")
    result = invoke("scan", path, "--calib", calib, "--size", "10x10", "--json", "-", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["preprocess"]["size"] == [10, 10]


def test_fixed_batch_model_with_partial_batches(model_file, pixels_file):
    path = model_file(models.plain_cnn(batch=1))
    result = invoke("scan", path, "--calib", pixels_file(5, 8, 8), "--batch-size", "4", "--json", "-", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["taps"][0]["stats"]["linf"]["mean"]


def test_inspect_json(fixtures_dir):
    result = invoke("inspect", fixtures_dir / "digits_badnets.onnx", "--json", "-")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["opset"] == 17 and [t["name"] for t in data["taps"] if t["is_last"]] == ["relu3_out"]


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and "onnx-linf" in result.stdout + result.stderr


def test_help_documents_exit_codes():
    result = invoke("scan", "--help")
    assert result.exit_code == 0
    assert "Exit codes" in result.stdout and "nothing to scan" in result.stdout


def test_batch_size_auto_is_reported(fixtures_dir):
    result = invoke("scan", fixtures_dir / "digits_clean.onnx", "--calib", fixtures_dir / "digits_calib",
                    "--batch-size", "auto", "--limit", "40", "--json", "-", "-q")
    assert result.exit_code == 0, result.stderr
    cal = json.loads(result.stdout)["calibration"]
    assert isinstance(cal["batch_size"], int) and 1 <= cal["batch_size"] <= 40
    assert "batch" in cal["batch_size_reason"]
    bad = invoke("scan", fixtures_dir / "digits_clean.onnx", "--calib", fixtures_dir / "digits_calib",
                 "--batch-size", "many")
    assert bad.exit_code == 2 and "--batch-size" in bad.stderr


@pytest.mark.parametrize("args, measured", [
    ((), {"linf", "l1"}),                                  # default: l2 costs the most, so it is opt-in
    (("--stats", "linf,l1,l2"), {"linf", "l1", "l2"}),
    (("--stats", "linf", "--score", "l2"), {"linf", "l2"}),  # the ranking score is always measured
])
def test_scan_measures_default_and_requested_stats(fixtures_dir, args, measured):
    result = invoke("scan", fixtures_dir / "digits_badnets.onnx", "--calib", fixtures_dir / "digits_calib",
                    "--json", "-", "--limit", "16", "--provider", "cpu", "-q", *args)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert all(set(t["stats"]) == measured for t in report["taps"])
    assert report["policy"]["score"] == f"clean {'l2' if 'l2' in args else 'linf'}"


def test_scan_unknown_stat_is_a_usage_error(fixtures_dir):
    result = invoke("scan", fixtures_dir / "digits_badnets.onnx", "--calib", fixtures_dir / "digits_calib",
                    "--stats", "linf,l3")
    assert_one_line_error(result, ExitCode.INPUT_ERROR, "unknown statistic 'l3' in --stats")


def test_layers_all_leaves_out_branches_and_all_branches_keeps_them(tmp_path):
    path = tmp_path / "resnet.onnx"
    import onnx

    onnx.save(models.resnet_block(), path)
    x = np.random.default_rng(0).normal(0, 1, (8, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    names = {}
    for layers in ("all", "all+branches"):
        result = invoke("scan", path, "--calib", tmp_path / "calib.npy", "--layers", layers, "--json", "-", "-q",
                        "--provider", "cpu")
        assert result.exit_code == 0, result.stderr
        names[layers] = {t["name"]: t["kind"] for t in json.loads(result.stdout)["taps"]}
    assert "bn2_out" not in names["all"] and names["all+branches"]["bn2_out"] == "branch"
    assert {k: v for k, v in names["all+branches"].items() if v != "branch"} == names["all"]
    inspected = invoke("inspect", path, "--json", "-")  # inspect lists every map with its kind
    assert {t["name"]: t["kind"] for t in json.loads(inspected.stdout)["taps"]} == names["all+branches"]
    assert "--layers all skips the 1 branch maps" in invoke("inspect", path).stderr
