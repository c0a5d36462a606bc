"""Half-precision models (float16 weights, maps and I/O, as exported for GPU deployment)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from typer.testing import CliRunner

from onnx_linf.cli.app import app
from onnx_linf.commands.options import PreprocessOptions
from onnx_linf.measure.instrument import instrument
from onnx_linf.measure.preprocess import Trigger
from onnx_linf.measure.session import create_session
from onnx_linf.model.load import load_model
from onnx_linf.model.taps import find_taps

import models

STATS = ("linf", "l1", "l2", "pos_max", "pos_min", "img_max", "img_min")


def with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """The model with some of its tensors as extra outputs, built with onnx.helper only."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT16, None) for n in names)
    return out.SerializeToString()


def test_float16_maps_measured_in_float32_equal_numpy(model_file):
    """Within float16 rounding: on the CPU, ORT runs most float16 ops in float32 between Casts it
    inserts, and drops a Cast-to-float16 followed by our Cast-to-float32, so the statistics may see
    a map before its rounding to float16 (half a float16 ulp, 4.9e-4 relative, away)."""
    proto = models.to_float16(models.resnet_block())
    model = load_model(model_file(proto))
    taps = find_taps(model, "all+branches")
    assert {t.elem_type for t in taps} == {TensorProto.FLOAT16}
    assert {t.non_negative for t in taps} == {True, False}  # both paths: pools on x, and on signed x
    inst = instrument(model, taps, STATS)
    x = np.random.default_rng(0).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    # The session casts the float32 batch to the model's float16 input.
    got = dict(zip(inst.output_names(), create_session(model, inst, "cpu").run(inst.output_names(), x)))
    # The maps themselves, in float16, from a separately built model fed the same float16 input.
    plain = ort.InferenceSession(with_outputs(proto, [t.name for t in taps]), providers=["CPUExecutionProvider"])
    maps = dict(zip([t.name for t in taps], plain.run([t.name for t in taps], {"input": x.astype(np.float16)})))
    for name, ref in inst.outputs.items():
        a = maps[ref.tap].astype(np.float64)
        assert maps[ref.tap].dtype == np.float16
        expected = {"linf": np.abs(a).max(axis=(2, 3)), "l1": np.abs(a).sum(axis=(2, 3)),
                    "l2": np.sqrt((a ** 2).sum(axis=(2, 3))), "pos_max": a.max(axis=0), "pos_min": a.min(axis=0),
                    "img_max": a.max(axis=(2, 3)), "img_min": a.min(axis=(2, 3))}[ref.stat]
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], expected, rtol=1e-3, atol=1e-3, err_msg=f"{ref.tap} {ref.stat}")


def test_float16_badnets_scan_clamp_and_prune(fixtures_dir, tmp_path):
    """The BadNets fixture in float16: scanned, clamped (the backdoor goes) and pruned, float16 kept."""
    path = tmp_path / "badnets16.onnx"
    onnx.save(models.to_float16(onnx.load(fixtures_dir / "digits_badnets.onnx")), path)
    runner = CliRunner()
    calib = fixtures_dir / "digits_calib"
    evidence = ["--trigger", fixtures_dir / "digits_badnets_trigger.png",
                "--mask", fixtures_dir / "digits_badnets_mask.png"]
    scan = runner.invoke(app, [str(a) for a in ["scan", path, "--calib", calib, "--json", "-", "-q", "--limit", "64",
                                                  "--layers", "last", *evidence]])
    assert scan.exit_code == 0, scan.stderr
    assert json.loads(scan.stdout)["taps"][0]["flagged"]
    inspected = json.loads(runner.invoke(app, ["inspect", str(path), "--json", "-"]).stdout)
    assert {t["dtype"] for t in inspected["taps"]} == {"float16"}

    # Suspect images (the test set, stamped) against the clean per-position range, cast in-graph too.
    suspect = tmp_path / "suspect.npz"
    test = np.load(fixtures_dir / "digits_test.npz")
    pre = PreprocessOptions().resolve(load_model(path))
    trig = Trigger.from_files(fixtures_dir / "digits_badnets_trigger.png", fixtures_dir / "digits_badnets_mask.png",
                              pre)
    np.savez(suspect, x=trig.stamp(test["x"][:64]))
    scan = runner.invoke(app, [str(a) for a in ["scan", path, "--calib", calib, "--json", "-", "-q", "--limit", "64",
                                                  "--suspect", suspect]])
    assert scan.exit_code == 0, scan.stderr
    exceed = json.loads(scan.stdout)["extra"]["bounds_exceedance"]
    assert set(exceed) == {"relu1_out", "relu2_out", "relu3_out"}
    assert all(v["images"] == 64 and v["max_relative_excess"] > 0.1 for v in exceed.values()), exceed

    out = tmp_path / "clamped.onnx"
    clamp = runner.invoke(app, [str(a) for a in ["clamp", path, "--calib", calib, "-o", out, "-q", "--strength", "100",
                                                   "--json", tmp_path / "clamp.json", "--eval-data",
                                                   fixtures_dir / "digits_test.npz", *evidence, "--target", "0"]])
    assert clamp.exit_code == 0, clamp.stderr
    clamped = onnx.load(out)
    assert clamped.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert {i.data_type for i in clamped.graph.initializer} == {TensorProto.FLOAT16, TensorProto.INT64} \
        or {i.data_type for i in clamped.graph.initializer} == {TensorProto.FLOAT16}
    report = json.loads((tmp_path / "clamp.json").read_text())
    assert report["verification"]["ok"] and report["calibration_agreement"] == 1.0
    before, after = report["evaluation"]["before"], report["evaluation"]["after"]
    assert before["asr"] > 0.95 and after["asr"] <= 0.05, (before, after)
    assert after["accuracy"] >= before["accuracy"] - 0.01

    pruned = tmp_path / "pruned.onnx"
    prune = runner.invoke(app, [str(a) for a in ["prune", path, "--calib", calib, "-o", pruned, "-q", "--ratio", "0.3",
                                                   *evidence]])
    assert prune.exit_code == 0, prune.stderr
    assert onnx.load(pruned).graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16


def test_float16_clamp_bounds_round_outwards(model_file):
    """A float32 bound between two float16 values becomes the outer one: clean values are never cut."""
    from onnx import numpy_helper

    from onnx_linf.rewrite.clamp import ClampBound, clamp_maps

    model = load_model(model_file(models.to_float16(models.resnet_block())))
    tap = next(t for t in find_taps(model, "all+branches") if not t.non_negative)
    hi = np.full((tap.channels, 1, 1), 1.0001, np.float32)  # float16 neighbours: 1.0 and 1.000977
    lo = np.full((tap.channels, 1, 1), -1.0001, np.float32)
    proto, _ = clamp_maps(model, {tap.name: ClampBound(hi=hi, lo=lo)})
    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer if "clamp" in i.name}
    (hi16,) = [v for k, v in consts.items() if "clamp_hi" in k]
    (lo16,) = [v for k, v in consts.items() if "clamp_lo" in k]
    assert hi16.dtype == lo16.dtype == np.float16
    assert np.all(hi16.astype(np.float32) >= hi) and np.all(hi16 == np.float16(1.000977))
    assert np.all(lo16.astype(np.float32) <= lo) and np.all(lo16 == np.float16(-1.000977))
