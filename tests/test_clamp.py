"""clamp: identity on the calibration set at q=100, bound shapes, two-sided maps, quantiles, effect."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from onnx_linf.cli.app import app
from onnx_linf.commands.clamp import ClampConfig, clamp
from onnx_linf.commands.options import PreprocessOptions
from onnx_linf.decide.bounds import topk_for_quantile
from onnx_linf.errors import UsageError
from onnx_linf.measure.instrument import instrument
from onnx_linf.measure.preprocess import Preprocess
from onnx_linf.measure.session import create_session
from onnx_linf.measure.sources import ImageFolder
from onnx_linf.model.load import load_model
from onnx_linf.model.taps import find_taps

import models

runner = CliRunner()


def outputs(model, proto, x):
    return create_session(model, proto, "cpu").run(None, x)[0]


def pixel_source(tmp_path, n, h, w, c, seed=0):
    x = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
    np.save(tmp_path / "calib.npy", x)
    return tmp_path / "calib.npy", x


@pytest.mark.parametrize("bounds", [("position",), ("position", "channel-mean")])
def test_identity_on_calibration_set_bitwise(fixtures_dir, bounds):
    """At q=100 the clamp never changes a value it was fitted on: Min(a, max(a)) == a exactly, and
    a channel whose mean is within its bound is multiplied by exactly 1."""
    model = load_model(fixtures_dir / "digits_badnets.onnx")
    result = clamp(model, fixtures_dir / "digits_calib", ClampConfig(provider="cpu", batch_size=50, bounds=bounds,
                                                                      strength=100.0))
    pp = Preprocess.from_model(model)
    x = np.concatenate([pp.apply(b.pixels) for b in ImageFolder(fixtures_dir / "digits_calib", pp.size, "L")
                        .batches(100)])
    np.testing.assert_array_equal(outputs(model, result.proto, x), outputs(model, None, x))
    assert result.report.verification["ok"] and result.report.calibration_agreement == 1.0


def test_position_and_channel_bound_shapes(model_file, tmp_path):
    model = load_model(model_file(models.plain_cnn()))
    calib, _ = pixel_source(tmp_path, 20, 8, 8, 3)
    pos = clamp(model, calib, ClampConfig(provider="cpu"))
    ch = clamp(model, calib, ClampConfig(provider="cpu", granularity="channel"))
    assert [b.hi.shape for b in pos.bounds] == [(6, 8, 8), (5, 8, 8)]
    assert [b.hi.shape for b in ch.bounds] == [(6, 1, 1), (5, 1, 1)]
    # Channel bounds are the max over positions of the position bounds (q = 100).
    for p, c in zip(pos.bounds, ch.bounds):
        np.testing.assert_allclose(c.hi[:, 0, 0], p.hi.reshape(p.hi.shape[0], -1).max(axis=1), rtol=1e-6)


def test_two_sided_on_negative_map(model_file, tmp_path):
    """LeakyRelu maps go negative: they get Max(a, lo) as well, and stay the identity on calibration data."""
    model = load_model(model_file(models.nhwc_input()))
    calib, x = pixel_source(tmp_path, 16, 8, 8, 3)
    result = clamp(model, calib, ClampConfig(provider="cpu", bounds=("position",)))
    sided = {b.tap: b.lo is not None for b in result.bounds}
    assert sided == {"lrelu_out": True, "relu2_out": False}
    lo = result.bounds[0].lo
    assert float(lo.min()) < 0
    ops = [n.op_type for n in result.proto.graph.node]
    assert ops.count("Max") == 1 and ops.count("Min") == 2
    xin = Preprocess.from_model(model).apply(x)
    np.testing.assert_array_equal(outputs(model, result.proto, xin), outputs(model, None, xin))


def test_values_beyond_bounds_are_cut(model_file, tmp_path):
    model = load_model(model_file(models.plain_cnn()))
    calib, x = pixel_source(tmp_path, 20, 8, 8, 3)
    result = clamp(model, calib, ClampConfig(provider="cpu", layers="last"))
    pp = Preprocess.from_model(model)
    bright = pp.apply(np.full((2, 8, 8, 3), 255, np.uint8)) * 4  # far outside the calibration range
    taps = find_taps(model, "last")
    raw_clamped = instrument(load_model(model_file(result.proto, "c.onnx")), taps, stats=("raw",))
    act = create_session(model, raw_clamped.proto, "cpu").run(raw_clamped.output_names(), bright)[0]
    assert np.all(act <= result.bounds[0].hi + 1e-6)


def test_dynamic_spatial_falls_back_to_channel(model_file, tmp_path):
    model = load_model(model_file(models.dynamic_spatial()))
    calib, _ = pixel_source(tmp_path, 8, 10, 10, 3)
    cfg = ClampConfig(provider="cpu", preprocess=PreprocessOptions(size=(10, 10)))
    result = clamp(model, calib, cfg)
    assert result.bounds[0].granularity == "channel" and result.bounds[0].hi.shape == (4, 1, 1)
    assert any("dynamic" in n for n in result.report.notes)


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("quantile", [50.0, 90.0, 99.0])
def test_streaming_quantile_is_exact(model_file, tmp_path, quantile, opset):
    """Bounds at q < 100 equal numpy's inverted-CDF quantile of the raw activations (batches of 7),
    in opset 11 too (its Min takes no int64: the in-graph K = min(k, batch) must not use it)."""
    model = load_model(model_file(models.plain_cnn(opset)))
    calib, x = pixel_source(tmp_path, 30, 8, 8, 3, seed=4)
    result = clamp(model, calib, ClampConfig(provider="cpu", quantile=quantile, batch_size=7))
    taps = find_taps(model)
    raw = instrument(model, taps, stats=("raw",))
    acts = create_session(model, raw.proto, "cpu").run(raw.output_names(), Preprocess.from_model(model).apply(x))
    for bound, act in zip(result.bounds, acts):
        expected = np.quantile(act.astype(np.float64), quantile / 100, axis=0, method="inverted_cdf")
        np.testing.assert_allclose(bound.hi, expected, rtol=1e-6, atol=1e-7)
    assert result.report.config["topk"] == topk_for_quantile(quantile, 30)


def test_quantile_range_checked(model_file, tmp_path):
    model = load_model(model_file(models.plain_cnn()))
    calib, _ = pixel_source(tmp_path, 5, 8, 8, 3)
    with pytest.raises(UsageError, match="--quantile must be in"):
        clamp(model, calib, ClampConfig(quantile=0))


def test_clamp_removes_badnets_on_fixture_without_trigger(fixtures_dir, tmp_path):
    """Acceptance: BadNets ASR <= 5% with clean accuracy down <= 1 point, no trigger given."""
    model = fixtures_dir / "digits_badnets.onnx"
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    r = runner.invoke(app, ["clamp", str(model), "--calib", str(fixtures_dir / "digits_calib"),
                            "-o", str(tmp_path / "safe.onnx"), "--eval-data", str(fixtures_dir / "digits_test.npz"),
                            "--trigger", str(fixtures_dir / "digits_badnets_trigger.png"),
                            "--mask", str(fixtures_dir / "digits_badnets_mask.png"), "--target", "0",
                            "--json", "-", "-q"])
    assert r.exit_code == 0, r.stderr
    ev = json.loads(r.stdout)["evaluation"]
    assert ev["before"]["asr"] >= 0.95
    assert ev["after"]["asr"] <= 0.05
    assert ev["after"]["accuracy"] >= ev["before"]["accuracy"] - 0.01
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before
    assert (tmp_path / "safe.onnx").exists()


@pytest.mark.parametrize("opset", [10, 11, 17])
def test_two_sided_quantile_bounds_in_every_topk_form(model_file, tmp_path, opset):
    """k-th largest / k-th smallest per element, streamed in batches of 7: opset 10 takes the
    smallest as -TopK(-x) (its TopK has no `largest`), 11+ uses `largest=0`."""
    model = load_model(model_file(models.nhwc_input(opset)))
    calib, x = pixel_source(tmp_path, 30, 8, 8, 3, seed=5)
    result = clamp(model, calib, ClampConfig(provider="cpu", quantile=90, batch_size=7))
    k = topk_for_quantile(90, 30)
    taps = find_taps(model)
    raw = instrument(model, taps, stats=("raw",))
    acts = create_session(model, raw.proto, "cpu").run(raw.output_names(), Preprocess.from_model(model).apply(x))
    assert any(b.lo is not None for b in result.bounds)  # the LeakyRelu map is two-sided
    for bound, act in zip(result.bounds, acts):
        ordered = np.sort(act, axis=0)
        np.testing.assert_array_equal(bound.hi, ordered[-k])
        if bound.lo is not None:
            np.testing.assert_array_equal(bound.lo, ordered[k - 1])


def test_old_opsets_clamp_at_q100_and_refuse_lower_quantiles_clearly(model_file, tmp_path):
    model = load_model(model_file(models.nhwc_input(9)))
    calib, _ = pixel_source(tmp_path, 12, 8, 8, 3)
    assert clamp(model, calib, ClampConfig(provider="cpu")).records  # q = 100: ReduceMax/Min, any opset
    with pytest.raises(UsageError, match="quantiles below 100 need opset >= 10"):
        clamp(model, calib, ClampConfig(provider="cpu", quantile=90))
