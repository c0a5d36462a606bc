"""Which activation maps are found, for the architectures users bring."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_linf.errors import UnsupportedModelError
from onnx_linf.model.load import load_model
from onnx_linf.model.taps import SMALL_INITIALIZER, find_taps, infer_shapes, weightless

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


def _full_inference_shapes(proto):
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True).graph
    return {vi.name: tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                           for d in vi.type.tensor_type.shape.dim)
            for vi in list(inferred.value_info) + list(inferred.output) if vi.type.tensor_type.HasField("shape")}


@pytest.mark.parametrize("build", [models.plain_cnn, models.resnet_block, models.depthwise, models.computed_weights,
                                   models.subgraph_reader, models.shared_weights, models.qdq_cnn])
def test_shape_inference_without_the_weights_finds_every_shape(build):
    proto = build()
    before = proto.SerializeToString()
    light = weightless(proto)
    shapes, _ = infer_shapes(proto)
    full = _full_inference_shapes(proto)
    assert full and all(shapes.get(name) == shape for name, shape in full.items())
    assert proto.SerializeToString() == before  # the model itself is left alone
    big = [i.name for i in proto.graph.initializer if np.prod(i.dims) > SMALL_INITIALIZER]
    assert not {i.name for i in light.graph.initializer} & set(big)
    assert set(big) <= {i.name for i in light.graph.input}


def test_weightless_copy_of_a_real_model_is_small(fixtures_dir):
    proto = onnx.load(str(fixtures_dir / "digits_badnets.onnx"))
    light = weightless(proto)
    assert light.ByteSize() < proto.ByteSize() / 5
    assert infer_shapes(proto) == infer_shapes(light)
