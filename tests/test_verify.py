"""Verification: a correct rewrite passes with its numbers; a wrong one fails with them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_linf.rewrite.verify as verify_module
from onnx_linf.errors import VerificationError
from onnx_linf.model.load import load_model
from onnx_linf.model.taps import find_taps
from onnx_linf.rewrite.reference import mask_reference
from onnx_linf.rewrite.verify import VerifyResult, require_ok, verify_model
from onnx_linf.rewrite.zero import zero_channels

import models

CHANNELS = {"relu1_out": [0, 3], "relu2_out": [2]}


def batches(n_batches=3, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, (n, 3, 8, 8)).astype(np.float32) for _ in range(n_batches)]


@pytest.fixture
def model(model_file):
    return load_model(model_file(models.plain_cnn()))


def copy(proto):
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def test_correct_rewrite_passes_with_its_numbers(model):
    candidate, _ = zero_channels(model, find_taps(model), CHANNELS)
    result = verify_model(model, candidate, mask_reference(model, CHANNELS), batches())
    assert result.ok
    assert list(result.checks) == ["checker", "ort_load", "io_preserved", "numeric"]
    assert result.checks["checker"] == result.checks["ort_load"] == result.checks["io_preserved"] == "ok"
    assert result.samples == 12
    assert 0 <= result.max_abs_diff <= result.tolerance
    assert result.tolerance >= 1e-4  # atol + rtol * |reference| at the largest difference
    assert result.checks["numeric"].startswith("max |diff| ") and result.checks["numeric"].endswith("on 12 inputs")
    require_ok(result)  # no exception


def test_wrong_candidate_fails_with_numbers_and_require_ok_raises(model):
    # The candidate zeroes another channel than the reference: a surgery bug verification must catch.
    candidate, _ = zero_channels(model, find_taps(model), {"relu1_out": [0, 4], "relu2_out": [2]})
    result = verify_model(model, candidate, mask_reference(model, CHANNELS), batches())
    assert not result.ok
    assert result.checks["checker"] == "ok" and result.checks["io_preserved"] == "ok"
    assert result.checks["numeric"].startswith("failed: ")
    assert "of 48 output values differ" in result.checks["numeric"]  # 12 inputs x 4 logits
    assert result.max_abs_diff > 1e-2 and result.samples == 12
    with pytest.raises(VerificationError) as info:
        require_ok(result)
    message = str(info.value)
    assert "\n" not in message
    assert f"max |diff| {result.max_abs_diff:.3g}" in message and "numeric: failed" in message
    assert info.value.details["max_abs_diff"] == result.max_abs_diff
    assert info.value.details["checks"] == result.checks
    assert info.value.exit_code == 1


def test_zeroing_only_the_conv_before_a_batchnorm_is_caught(model):
    # BN(0) = beta - mean * gamma / sqrt(var + eps): where that is > 0 the Relu passes it on.
    w = {i.name: numpy_helper.to_array(i) for i in model.proto.graph.initializer}
    offset = w["bn1.bias"] - w["bn1.mean"] * w["bn1.scale"] / np.sqrt(w["bn1.var"] + 1e-5)
    channels = [int(c) for c in np.flatnonzero(offset > 0.05)]
    assert channels
    naive = copy(model.proto)
    for init in naive.graph.initializer:
        if init.name in ("conv1.w", "conv1.b"):
            arr = numpy_helper.to_array(init).copy()
            arr[channels] = 0
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    result = verify_model(model, naive, mask_reference(model, {"relu1_out": channels}), batches())
    assert not result.ok and result.max_abs_diff > result.tolerance


def test_exact_mode_is_bitwise(model):
    identity, _ = zero_channels(model, find_taps(model), {})
    result = verify_model(model, identity, model.proto, batches(), exact=True)
    assert result.ok and result.max_abs_diff == 0.0 and result.tolerance == 0.0
    assert "bitwise" in result.checks["numeric"]

    # Nudge one logit bias by 1e-5: within the default tolerance, but not bitwise equal.
    nudged = copy(model.proto)
    bias = next(i for i in nudged.graph.initializer if i.name == "fc.b")
    arr = numpy_helper.to_array(bias).copy()
    arr[0] += np.float32(1e-5)
    bias.CopyFrom(numpy_helper.from_array(arr, "fc.b"))
    assert verify_model(model, nudged, model.proto, batches()).ok
    strict = verify_model(model, nudged, model.proto, batches(), exact=True)
    assert not strict.ok and "bitwise" in strict.checks["numeric"]
    assert 0 < strict.max_abs_diff < 1e-4


@pytest.mark.parametrize("change, message", [
    (lambda p: setattr(p.graph.output[0], "name", "renamed"), "outputs changed"),
    (lambda p: p.graph.input[0].type.tensor_type.shape.dim[0].__setattr__("dim_param", "B"), "inputs changed"),
    (lambda p: setattr(p.opset_import[0], "version", 16), "opset imports changed"),
    (lambda p: setattr(p, "ir_version", 7), "IR version changed from 8 to 7"),
])
def test_interface_changes_fail_io_preserved(model, change, message):
    candidate = copy(model.proto)
    change(candidate)
    result = verify_model(model, candidate, model.proto, batches(1))
    assert not result.ok
    assert result.checks["io_preserved"].startswith("failed: ") and message in result.checks["io_preserved"]


def test_invalid_candidate_fails_checker_and_load(model):
    broken = copy(model.proto)
    broken.graph.node.append(helper.make_node("Mul", ["fc_out", "missing"], ["extra"], name="bad"))
    result = verify_model(model, broken, model.proto, batches(1))
    assert not result.ok
    assert result.checks["checker"].startswith("failed: ")
    assert result.checks["ort_load"].startswith("failed: ")
    assert result.checks["numeric"].startswith("skipped: ")
    assert result.samples == 0
    with pytest.raises(VerificationError, match="checker: failed"):
        require_ok(result)


def test_no_inputs_is_a_failure(model):
    result = verify_model(model, model.proto, model.proto, [])
    assert not result.ok and result.checks["numeric"] == "failed: no input batches to compare on"


def test_external_data_candidate_is_checked_from_a_file(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(models.plain_cnn(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    model = load_model(path)
    candidate, records = zero_channels(model, find_taps(model), CHANNELS)
    assert {r.method for r in records} == {"mask"}
    result = verify_model(model, candidate, mask_reference(model, CHANNELS), batches())
    assert result.ok, result.checks


def test_big_models_use_the_path_based_checker(model, monkeypatch):
    # Models over protobuf's 2 GB limit cannot be checked in memory; shrink the limit to exercise
    # the file-based path (saved with external data) on a small model.
    monkeypatch.setattr(verify_module, "_PROTOBUF_LIMIT", 1000)
    candidate, _ = zero_channels(model, find_taps(model), CHANNELS)
    assert candidate.ByteSize() > 1000
    assert verify_module._check(candidate) == "ok"
    assert all(i.data_location == onnx.TensorProto.DEFAULT for i in candidate.graph.initializer)  # untouched
    broken = copy(candidate)
    broken.graph.node.append(helper.make_node("Relu", ["missing"], ["extra"], name="bad"))
    assert verify_module._check(broken).startswith("failed: ")


def test_result_is_a_frozen_record(model):
    result = verify_model(model, model.proto, model.proto, batches(1), exact=True)
    assert isinstance(result, VerifyResult) and result.ok
    with pytest.raises(AttributeError):
        result.ok = False  # type: ignore[misc]


def test_external_locations_outside_the_folder_are_refused(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(models.plain_cnn(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    candidate = load_model(path).proto
    for entry in candidate.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../escaped.data"
    assert verify_module._check(candidate) == \
        "failed: external data location '../escaped.data' is outside the model's folder"
    assert not (Path(tempfile.gettempdir()) / "escaped.data").exists()
