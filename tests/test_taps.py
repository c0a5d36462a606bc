"""Which activation maps are found, for the architectures users bring."""

from __future__ import annotations

import pytest

from onnx_linf.errors import UnsupportedModelError
from onnx_linf.model.load import load_model
from onnx_linf.model.taps import find_taps

import models


def names(taps):
    return [t.name for t in taps]


def test_plain_cnn_last_conv_feeding_flatten_gemm(model_file):
    model = load_model(model_file(models.plain_cnn()))
    taps = find_taps(model)
    assert names(taps) == ["relu1_out", "relu2_out"]
    assert taps[0].chain == ("conv1", "bn1", "relu1")  # BN and Relu belong to the map
    assert names(find_taps(model, "last")) == ["relu2_out"]


def test_resnet_last_is_post_residual_relu(model_file):
    model = load_model(model_file(models.resnet_block()))
    taps = {t.name: t for t in find_taps(model, "all+branches")}
    # The conv before the residual Add ends at its BN: the Add is not a per-channel op. It only
    # feeds the merge, so it is a branch: measured by "all+branches", left out of "all".
    assert taps["bn2_out"].kind == "branch" and not taps["bn2_out"].non_negative
    assert taps["post_relu_out"].kind == "merge"
    assert names(find_taps(model)) == [name for name, t in taps.items() if t.kind != "branch"]
    assert names(find_taps(model)) == ["stem_relu_out", "r1_out", "post_relu_out"]
    assert names(find_taps(model, "last")) == ["post_relu_out"]
    assert find_taps(model, ["bn2_out"])[0].kind == "branch"  # still selectable by name


def test_depthwise_and_clip(model_file):
    model = load_model(model_file(models.depthwise()))
    taps = find_taps(model)
    assert names(taps) == ["clip0_out", "clip1_out", "relu2_out"]
    assert all(t.non_negative for t in taps)  # Clip(0, 6) is non-negative
    assert [t.channels for t in taps] == [8, 8, 6]


def test_nhwc_input_and_negative_maps(model_file):
    model = load_model(model_file(models.nhwc_input()))
    taps = find_taps(model)
    assert names(taps) == ["lrelu_out", "relu2_out"]
    assert not taps[0].non_negative  # LeakyRelu goes negative: ℓ∞ needs Abs


def test_dynamic_spatial_size_is_none(model_file):
    tap = find_taps(load_model(model_file(models.dynamic_spatial())))[0]
    assert tap.spatial == (None, None) and not tap.static_spatial


def test_explicit_names(model_file):
    model = load_model(model_file(models.resnet_block()))
    assert names(find_taps(model, ["r1_out", "stem_relu_out"])) == ["r1_out", "stem_relu_out"]
    with pytest.raises(UnsupportedModelError, match="'nope' is not a 4-D activation map"):
        find_taps(model, ["nope"])


def test_fixture_taps(fixtures_dir):
    model = load_model(fixtures_dir / "digits_badnets.onnx")
    taps = find_taps(model)
    assert names(taps) == ["relu1_out", "relu2_out", "relu3_out"]
    # relu3 -> MaxPool -> Flatten -> Gemm: the head sees relu3 through the pooling.
    assert names(find_taps(model, "last")) == ["relu3_out"]


def test_silu_gate_belongs_to_the_map(model_file):
    model = load_model(model_file(models.silu_cnn()))
    taps = find_taps(model)
    assert names(taps) == ["swish_out", "relu2_out"]
    assert taps[0].chain == ("c1", "bn1", "sig", "swish") and not taps[0].non_negative
