"""The data-free scan (no --calib): its statistics, the margin probe on models with a known answer, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from onnx_linf.cli.app import app
from onnx_linf.cli.exit_codes import ExitCode
from onnx_linf.commands.datafree import datafree_checks
from onnx_linf.decide.datafree import RUNNER_UP_FLOOR, clp_check, margin_ratio
from onnx_linf.errors import UsageError
from onnx_linf.measure.margin import MarginConfig, margins_of, max_margins
from onnx_linf.measure.preprocess import Preprocess
from onnx_linf.model.load import load_model
from onnx_linf.model.taps import find_taps

import models

runner = CliRunner()
CHANNELS, CLASSES = 16, 5
# White (+1) at the corners and centre, black (-1) elsewhere: the BadNets checkerboard.
CHECKER = np.array([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])


def tiny_classifier(planted: bool):
    """input[N,1,8,8] -> Conv(3x3, 16, pad 1) -> Relu -> GlobalMaxPool -> Flatten -> Gemm -> logits[N,5]

    Every channel and class weight is seeded noise, except, when `planted`, channel 0: a 3x3
    checkerboard detector with gain 10 and bias -40 (silent unless the input holds a near-perfect
    checkerboard somewhere, in [0, 1] pixels), wired to class 0 with weight 20. So from noise, class 0
    is reachable with a margin of up to 200 while every other class stays within a few units: the
    backdoor's shape in weights (an extreme channel) and in outputs (an extreme margin).
    """
    g = models.GraphBuilder(3)
    w = g.rng.normal(0, 0.3, (CHANNELS, 1, 3, 3))
    b = g.rng.normal(0, 0.1, CHANNELS)
    fc = g.rng.normal(0, 0.3, (CLASSES, CHANNELS))
    if planted:
        w[0, 0], b[0] = 10.0 * CHECKER, -40.0
        fc[:, 0], fc[0, 0] = 0.0, 20.0
    conv = g.node("Conv", ["input", g.const("conv.w", w), g.const("conv.b", b)], "conv", pads=[1] * 4,
                  kernel_shape=[3, 3])
    relu = g.node("Relu", [conv], "relu")
    pool = g.node("GlobalMaxPool", [relu], "pool")
    flat = g.node("Flatten", [pool], "flatten", axis=1)
    out = g.node("Gemm", [flat, g.const("fc.w", fc), g.const("fc.b", np.zeros(CLASSES))], "fc", transB=1)
    return g.model(["N", 1, 8, 8], out, ["N", CLASSES])


FAST = MarginConfig(max_queries=3000, pool=64)


@pytest.mark.parametrize("planted", [True, False])
def test_planted_channel_is_found_by_both_checks_and_its_twin_is_clean(model_file, planted):
    """The answer is known by construction: the planted model is suspected with target 0 by the
    margin probe and its checkerboard channel by CLP; the same network without it is clean."""
    model = load_model(model_file(tiny_classifier(planted), f"tiny_{planted}.onnx"))
    verdict, _ = datafree_checks(model, find_taps(model, "all"), Preprocess.from_model(model), "cpu", FAST)
    clp, margin = verdict.checks
    assert margin.queries <= FAST.max_queries
    if planted:
        assert verdict.verdict == "suspected" and verdict.target == 0 and margin.top_class == 0
        assert margin.margins[0] > 50 and margin.statistic > 10
        assert clp.suspected and (clp.layer, clp.channel) == ("relu_out", 0)
        assert verdict.reason.startswith("data-free:")
    else:
        assert verdict.verdict == "clean" and verdict.target is None
        assert margin.statistic < margin.threshold and clp.statistic < clp.threshold
        assert "add --calib" in verdict.reason


def test_probe_is_seeded_and_the_class_count_does_not_raise_the_cost(model_file):
    model = load_model(model_file(tiny_classifier(True), "tiny.onnx"))
    pre = Preprocess.from_model(model)
    a = max_margins(model, pre, FAST, "cpu")
    b = max_margins(model, pre, FAST, "cpu")
    np.testing.assert_array_equal(a.margins, b.margins)
    # Pre-selection: with room for 3 classes only, 2 are left out, the budget holds, and the target
    # (already the highest margin on noise) is among those searched.
    few = max_margins(model, pre, MarginConfig(max_queries=3000, pool=64, max_classes=3), "cpu")
    assert len(few.classes) == 3 and len(few.not_examined) == 2 and 0 in few.classes
    assert few.queries <= 3000 and a.queries <= 3000
    with pytest.raises(UsageError, match="max_queries"):
        max_margins(model, pre, MarginConfig(max_queries=50, pool=64), "cpu")


def test_margin_and_clp_statistics_by_hand():
    scores = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])
    np.testing.assert_allclose(margins_of(scores, np.array([0, 2])), [1.0, -1.0])
    assert margin_ratio(np.array([2.0, 10.0, 4.0])) == (2.5, 1)
    assert margin_ratio(np.array([-1.0, -3.0, -2.0])) == (0.0, 0)  # no class reachable: nothing to flag
    # Only one class reaches a positive margin: the floor caps the ratio at 1 / RUNNER_UP_FLOOR.
    assert margin_ratio(np.array([8.0, -1.0, -2.0]))[0] == pytest.approx(1 / RUNNER_UP_FLOOR)
    with pytest.raises(ValueError):
        margin_ratio(np.array([1.0]))
    layer = np.array([1.0, 1.1, 0.9, 1.0, 1.2, 0.8, 6.0])
    check = clp_check({"a": layer, "flat": np.ones(5)})
    med, mad = np.median(layer), np.median(np.abs(layer - np.median(layer)))
    assert check.statistic == pytest.approx(0.6745 * (6.0 - med) / mad)
    assert (check.layer, check.channel, check.layers_scored) == ("a", 6, 1)  # a constant layer is not scored


def scan(*args):
    return runner.invoke(app, ["scan", *[str(a) for a in args], "--provider", "cpu", "--max-queries", "6000"])


@pytest.mark.parametrize(("name", "code", "verdict"), [("digits_clean", ExitCode.OK, "clean"),
                                                       ("digits_blended", ExitCode.SUSPECTED, "suspected")])
def test_cli_data_free_scan_on_the_fixtures(fixtures_dir, tmp_path, name, code, verdict):
    out = tmp_path / "report.json"
    result = scan(fixtures_dir / f"{name}.onnx", "--fail-on-suspect", "--json", out, "--summary",
                  tmp_path / "summary.md")
    assert result.exit_code == code, result.stderr
    report = json.loads(out.read_text())
    assert report["verdict"] == verdict and report["evidence"]["kind"] == "data-free"
    assert report["verdict_reason"].startswith("data-free:")
    assert report["calibration"] == {"source": None, "images": 0, "batch_size": None, "data_free": True}
    section = report["extra"]["datafree"]
    assert [c["check"] for c in section["checks"]] == ["clp", "margin"]
    assert all({"statistic", "threshold", "suspected", "queries"} <= set(c) for c in section["checks"])
    assert section["queries"] <= 6000 and section["not_checked"]
    if verdict == "suspected":
        assert report["evidence"]["target"] == 0  # the fixture's attack target
    assert "data-free checks" in result.stderr and "--calib DATA" in result.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert ("0 (data-free)" if verdict == "suspected" else "none (data-free)") in summary
    # Without --fail-on-suspect the data-free verdict is reported, and the scan exits 0.
    assert scan(fixtures_dir / f"{name}.onnx", "-q").exit_code == ExitCode.OK


@pytest.mark.parametrize(("extra", "message"), [
    (["--synthesize"], "need clean images: add --calib DATA"),
    (["--trigger", "digits_badnets_trigger.png"], "need clean images: add --calib DATA"),
    (["--ray"], "--ray computes calibration statistics: it needs --calib DATA"),
])
def test_cli_evidence_without_calibration_is_one_line(fixtures_dir, extra, message):
    result = scan(fixtures_dir / "digits_clean.onnx", *[str(fixtures_dir / e) if e.endswith(".png") else e
                                                        for e in extra])
    assert result.exit_code == ExitCode.INPUT_ERROR, result.stderr
    assert result.stderr.startswith("error:") and message in result.stderr and "Traceback" not in result.stderr


def test_cli_folder_scan_without_calibration_is_one_line(fixtures_dir):
    result = scan(fixtures_dir)
    assert result.exit_code == ExitCode.INPUT_ERROR and result.stderr.startswith("error:")
    assert "need --calib" in result.stderr
