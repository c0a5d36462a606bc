"""Suspected classes excluded from the images the score gate flags (`rewrite.exclude`, ``clamp --suspects``)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from onnx_linf.cli.app import app
from onnx_linf.commands.clamp import ClampConfig, clamp
from onnx_linf.commands.scan import ScanConfig, scan
from onnx_linf.errors import RewriteError, UsageError
from onnx_linf.measure.preprocess import Preprocess
from onnx_linf.measure.session import create_session
from onnx_linf.model.load import load_model
from onnx_linf.rewrite.clamp import GATED_OUTPUT, ClampBound, MeanBound, clamp_maps

import models

runner = CliRunner()
C, H, W = 4, 5, 6


def pooled_classifier(tmp_path, opset: int):
    """input [N,C,H,W] -> Identity (the map a) -> GlobalAveragePool -> Flatten -> scores [N, C]."""
    nodes = [helper.make_node("Identity", ["input"], ["a"], name="make_map"),
             helper.make_node("GlobalAveragePool", ["a"], ["pooled"], name="pool"),
             helper.make_node("Flatten", ["pooled"], ["scores"], name="flatten", axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", C, H, W])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", C])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.save(proto, tmp_path / "pooled.onnx")
    return load_model(tmp_path / "pooled.onnx")


def gated_images(seed: int = 3):
    """Eight maps; images 1, 4 and 6 raise channel 2 (the class it scores) far above the bound."""
    rng = np.random.default_rng(seed)
    a = np.abs(rng.normal(1.0, 0.2, (8, C, H, W))).astype(np.float32)
    for i in (1, 4, 6):
        a[i, 2] *= 4.0
    bound = ClampBound(hi=None, mean=MeanBound(np.full(C, 1.6, np.float32), power=1.0, eps=1e-3,
                                               gate_hi=np.full(C, 1.2, np.float32)))
    return a, bound


@pytest.mark.parametrize("opset", [13, 18])
def test_gated_images_never_get_an_excluded_class_and_the_others_are_untouched(tmp_path, opset):
    model = pooled_classifier(tmp_path, opset)
    a, bound = gated_images()
    plain, _ = clamp_maps(model, {"a": bound}, gate_threshold=0.5, gate_output=True)
    scores, gated = create_session(model, plain, "cpu").run(None, a)
    assert gated.tolist() == [i in (1, 4, 6) for i in range(8)]
    assert (scores[gated].argmax(1) == 2).all()  # bounded, class 2 still wins: what the exclusion is for
    proto, _ = clamp_maps(model, {"a": bound}, gate_threshold=0.5, gate_output=True, gate_exclude=(2, 0))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.name for o in proto.graph.output] == ["scores", GATED_OUTPUT]
    got, got_gated = create_session(model, proto, "cpu").run(None, a)
    np.testing.assert_array_equal(got_gated, gated)
    np.testing.assert_array_equal(got[~gated], scores[~gated])  # bit for bit
    lowest = scores[gated].min(axis=1)
    np.testing.assert_array_equal(got[gated][:, [0, 2]], np.stack([lowest, lowest], axis=1))
    np.testing.assert_array_equal(got[gated][:, [1, 3]], scores[gated][:, [1, 3]])
    assert not np.isin(got[gated].argmax(1), (0, 2)).any()
    assert (got[~gated].argmax(1) == scores[~gated].argmax(1)).all()


def test_exclusion_refuses_what_it_cannot_do(tmp_path):
    model = pooled_classifier(tmp_path, 17)
    _, bound = gated_images()
    with pytest.raises(RewriteError, match=r"classes \[4\] are not among the 4 classes of 'scores'"):
        clamp_maps(model, {"a": bound}, gate_threshold=0.5, gate_exclude=(1, 4))
    with pytest.raises(RewriteError, match="needs the score gate"):
        clamp_maps(model, {"a": bound}, gate_exclude=(1,))
    with pytest.raises(RewriteError, match="unknown classifier output 'nope'"):
        clamp_maps(model, {"a": bound}, gate_threshold=0.5, gate_exclude=(1,), exclude_from="nope")
    with pytest.raises(RewriteError, match=r"\[N, K\] with a static K; 'a'"):
        clamp_maps(model, {"a": bound}, gate_threshold=0.5, gate_exclude=(1,), exclude_from="a")


def gated_clamp(model_file, pixels_file):
    """A clamp whose gate flags ~20% of its calibration images (`test_clamp_v2`'s gate-output setting)."""
    path = model_file(models.plain_cnn())
    calib = pixels_file(1000, 8, 8, 3)
    config = ClampConfig(provider="cpu", strength_grid=(100.0,), gate_alarm=0.2, slack=0.5, evidence_quantile=99.5,
                         gate_output=True, suspects="none")
    return path, calib, config


def test_clamp_suspects_given_are_never_the_class_of_a_gated_image(model_file, pixels_file):
    path, calib, config = gated_clamp(model_file, pixels_file)
    plain = clamp(path, calib, config)
    model = load_model(path)
    x = Preprocess.from_model(model).apply(np.load(calib))
    logits, gated = create_session(model, plain.proto, "cpu").run(None, x)
    sink = int(np.bincount(logits[gated].argmax(1), minlength=4).argmax())  # where gated images go
    assert (logits[gated].argmax(1) == sink).sum() > 0
    result = clamp(path, calib, dataclasses.replace(config, suspects=(sink,)))
    assert result.report.verification["ok"]
    assert result.report.strength["gate"]["suspects"] == {"source": "given", "classes": [sink]}
    got, got_gated = create_session(model, result.proto, "cpu").run(None, x)
    np.testing.assert_array_equal(got_gated, gated)
    np.testing.assert_array_equal(got[~gated], logits[~gated])
    assert not (got[gated].argmax(1) == sink).any()
    assert json.loads(result.report.to_json())["strength"]["gate"]["suspects"]["classes"] == [sink]


def test_gate_response_exclude_bounds_a_gated_image_as_any_other(model_file, pixels_file):
    """With a suspect the default response (auto) is the exclusion alone: a gated image's scores are
    those of the clamp without the gate, the suspect's replaced by the row minimum; `average` still
    pushes it to clean averages, and `exclude` needs a suspect."""
    path, calib, config = gated_clamp(model_file, pixels_file)
    model = load_model(path)
    x = Preprocess.from_model(model).apply(np.load(calib))
    ungated = create_session(model, clamp(path, calib, dataclasses.replace(config, gate=None, gate_output=False)).proto,
                             "cpu").run(None, x)[0]
    pushed, gated = create_session(model, clamp(path, calib, config).proto, "cpu").run(None, x)
    assert gated.any() and not np.array_equal(pushed[gated], ungated[gated])
    for response in ("auto", "exclude", "average"):
        result = clamp(path, calib, dataclasses.replace(config, suspects=(1,), gate_response=response))
        assert result.report.strength["gate"]["response"] == ("average" if response == "average" else "exclude")
        tightens = any("gated_bound" in o for node in result.proto.graph.node for o in node.output)
        assert tightens == (response == "average")  # flag only: no gated bound in the graph
        got, got_gated = create_session(model, result.proto, "cpu").run(None, x)
        np.testing.assert_array_equal(got_gated, gated)
        base = pushed if response == "average" else ungated
        np.testing.assert_array_equal(got[:, [0, 2, 3]], base[:, [0, 2, 3]])
        np.testing.assert_array_equal(got[gated][:, 1], base[gated].min(axis=1))
        np.testing.assert_array_equal(got[~gated][:, 1], base[~gated][:, 1])
    assert clamp(path, calib, config).report.strength["gate"]["response"] == "average"  # no suspect
    with pytest.raises(UsageError, match="exclude with --suspects; not .exclude."):
        ClampConfig(gate_response="exclude", suspects="none").validate()


def test_clamp_suspects_from_a_scan_report_and_from_the_probes(model_file, pixels_file, tmp_path):
    path, calib, config = gated_clamp(model_file, pixels_file)
    report = scan(path, calib, ScanConfig(provider="cpu"))
    report_path = tmp_path / "scan.json"
    report_path.write_text(dataclasses.replace(report, evidence={"kind": "verdict", "suspected": [3, 1]}).to_json())
    result = clamp(path, calib, dataclasses.replace(config, suspects=str(report_path)))
    assert result.report.strength["gate"]["suspects"] == {"source": str(report_path), "classes": [1, 3]}
    other = model_file(models.plain_cnn(opset=13), "other.onnx")
    with pytest.raises(UsageError, match="was made for another model"):
        clamp(other, calib, dataclasses.replace(config, suspects=str(report_path)))
    probed = clamp(path, calib, dataclasses.replace(config, suspects="auto")).report.strength["gate"]["suspects"]
    assert probed["source"] == "probes" and probed["probes"]["queries"] > 10_000
    assert probed["classes"] == sorted(f["target"] for f in probed["probes"]["families"] if f["suspected"])
    with pytest.raises(UsageError, match="class indices >= 0"):
        ClampConfig(suspects=(-1,)).validate()


def test_cli_suspects(fixtures_dir, tmp_path):
    args = ["clamp", str(fixtures_dir / "digits_blended.onnx"), "--calib", str(fixtures_dir / "digits_calib")]
    r = runner.invoke(app, args + ["-o", str(tmp_path / "a.onnx"), "--suspects", "0",
                                   "--json", str(tmp_path / "a.json"), "--summary", str(tmp_path / "a.md")])
    assert r.exit_code == 0, r.output
    assert "A flagged image is never given class 0 (suspected: given)." in (tmp_path / "a.md").read_text()
    assert "never given class 0 (suspected by --suspects)" in " ".join(r.output.split())
    gate = json.loads((tmp_path / "a.json").read_text())["strength"]["gate"]
    assert gate["suspects"] == {"source": "given", "classes": [0]}
    r = runner.invoke(app, args + ["-o", str(tmp_path / "b.onnx"), "--suspects", "zero"])
    assert r.exit_code == 2 and "--suspects takes none, auto, class indices" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "b.onnx").exists()
    r = runner.invoke(app, args + ["-o", str(tmp_path / "c.onnx"), "--suspects", "7,12"])
    assert r.exit_code != 0 and "classes [12] are not among the 10 classes" in " ".join(r.output.split())
    assert not (tmp_path / "c.onnx").exists()


def test_where_the_probes_suspect_nothing_the_gate_alarm_is_capped(fixtures_dir):
    """digits_clean: the probes suspect no class (measured), so the default clamp (--suspects auto)
    writes exactly the model --suspects none --gate-alarm 0.005 writes (uncapped: --suspects none's),
    and reports the probes it ran; with a suspect (digits_blended) both alarms are tried."""
    model = load_model(fixtures_dir / "digits_clean.onnx")
    auto = clamp(model, fixtures_dir / "digits_calib", ClampConfig(provider="cpu"))
    none = clamp(model, fixtures_dir / "digits_calib", ClampConfig(provider="cpu", suspects="none"))
    suspects = auto.report.strength["gate"]["suspects"]
    assert suspects["source"] == "probes" and suspects["classes"] == [] and suspects["probes"]["queries"] > 10_000
    assert auto.report.strength["gate"]["response"] == "average" and "suspects" not in none.report.strength["gate"]
    # No suspect: the gate's alarm is capped at 0.5% (here both alarms fit, 1% is kept without the cap)
    assert auto.report.strength["gate"]["alarms"] == [0.005] and none.report.strength["gate"]["alarms"] == [0.01, 0.005]
    uncapped = clamp(model, fixtures_dir / "digits_calib", ClampConfig(provider="cpu", unsuspected_alarm=None))
    assert uncapped.proto.SerializeToString() == none.proto.SerializeToString()
    capped = clamp(model, fixtures_dir / "digits_calib", ClampConfig(provider="cpu", suspects="none", gate_alarm=0.005))
    assert auto.proto.SerializeToString() == capped.proto.SerializeToString()
    blended = clamp(fixtures_dir / "digits_blended.onnx", fixtures_dir / "digits_calib", ClampConfig(provider="cpu"))
    assert blended.report.strength["gate"]["suspects"]["classes"] == [0]
    assert blended.report.strength["gate"]["alarms"] == [0.01, 0.005]


def test_cli_unsuspected_alarm(fixtures_dir, tmp_path):
    args = ["clamp", str(fixtures_dir / "digits_clean.onnx"), "--calib", str(fixtures_dir / "digits_calib")]
    r = runner.invoke(app, args + ["-o", str(tmp_path / "a.onnx"), "--unsuspected-alarm", "x"])
    assert r.exit_code == 2 and "--unsuspected-alarm takes a share in (0, 0.5) or none" in r.output
    r = runner.invoke(app, args + ["-o", str(tmp_path / "a.onnx"), "--unsuspected-alarm", "none",
                                   "--json", str(tmp_path / "a.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "a.json").read_text())["strength"]["gate"]["alarms"] == [0.01, 0.005]
