"""Graph surgery: every fold is the same function as the independent mask reference, zeroed
channels are exactly 0, and the rewrite keeps the model's interface and metadata."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_linf.errors import RewriteError
from onnx_linf.measure.instrument import instrument
from onnx_linf.measure.session import create_session
from onnx_linf.model.load import load_model
from onnx_linf.model.taps import find_taps
from onnx_linf.rewrite.clamp import ClampBound, clamp_maps
from onnx_linf.rewrite.reference import mask_reference
from onnx_linf.rewrite.zero import zero_channels

import models

# Builder, input shape (without batch), expected method per tap.
CASES = {
    "plain_cnn": (models.plain_cnn, (3, 8, 8), {"relu1_out": "bn-fold", "relu2_out": "conv-fold"}),
    "plain_cnn_opset13": (lambda: models.plain_cnn(opset=13), (3, 8, 8),
                          {"relu1_out": "bn-fold", "relu2_out": "conv-fold"}),
    "resnet_block": (models.resnet_block, (3, 8, 8),
                     {"stem_relu_out": "bn-fold", "r1_out": "bn-fold", "bn2_out": "bn-fold",
                      "post_relu_out": "mask"}),
    "depthwise": (models.depthwise, (3, 8, 8),
                  {"clip0_out": "conv-fold", "clip1_out": "conv-fold", "relu2_out": "conv-fold"}),
    "nhwc_input": (models.nhwc_input, (8, 8, 3), {"lrelu_out": "conv-fold", "relu2_out": "conv-fold"}),
    "computed_weights": (models.computed_weights, (3, 6, 6), {"relu_out": "mask"}),
    "affine_chain": (models.affine_chain, (3, 8, 8), {"relu1_out": "bn-fold", "clip2_out": "conv-fold"}),
    "non_zero_preserving": (models.non_zero_preserving, (3, 6, 6), {"clip1_out": "mask", "sig2_out": "mask"}),
    "shared_weights": (models.shared_weights, (4, 6, 6), {"relu_a_out": "conv-fold", "relu_b_out": "conv-fold"}),
    "tap_output": (models.tap_output, (3, 6, 6), {"relu1_out": "conv-fold", "relu2_out": "conv-fold"}),
}


def batch(shape, n=6, seed=0):
    return np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype(np.float32)


def run(model, proto, x):
    return create_session(model, proto, "cpu", threads=1).run(None, x)


def tap_values(model, proto, names, x):
    """The raw activations of tensors `names` in `proto` (a rewrite keeps tap names)."""
    taps = {t.name: t for t in find_taps(model, list(names))}
    inst = instrument(dataclasses.replace(model, proto=proto), [taps[n] for n in names], stats=("raw",))
    values = create_session(model, inst.proto, "cpu", threads=1).run(inst.output_names(), x)
    return {inst.outputs[o].tap: v for o, v in zip(inst.output_names(), values, strict=True)}


def topologically_sorted(proto):
    known = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer}
    for node in proto.graph.node:
        if any(i and i not in known for i in node.input):
            return False
        known.update(node.output)
    return True


def some_channels(c):
    return sorted({0, c // 2, c - 1})


def inits(proto):
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


@pytest.fixture
def load(model_file):
    def make(proto, name="model.onnx"):
        return load_model(model_file(proto, name))
    return make


@pytest.mark.parametrize("case", list(CASES))
def test_rewrite_equals_mask_reference_and_zeroes_taps(case, load):
    build, shape, methods = CASES[case]
    model = load(build())
    original = model.proto.SerializeToString()
    taps = find_taps(model, "all+branches")
    assert {t.name for t in taps} == set(methods)
    channels = {t.name: some_channels(t.channels) for t in taps}

    new, records = zero_channels(model, taps, channels)
    onnx.checker.check_model(new, full_check=True)
    assert topologically_sorted(new)
    assert {r.tap: r.method for r in records} == methods
    assert all(r.channels == tuple(channels[r.tap]) for r in records)
    assert model.proto.SerializeToString() == original  # the input model is never edited

    reference = mask_reference(model, channels)
    onnx.checker.check_model(reference, full_check=True)
    x = batch(shape)
    got, want, before = run(model, new, x), run(model, reference, x), run(model, model.proto, x)
    for g, w, b in zip(got, want, before, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        assert not np.allclose(g, b, atol=1e-3)  # the zeroing did change the model

    got_taps = tap_values(model, new, list(channels), x)
    want_taps = tap_values(model, reference, list(channels), x)
    for name, chans in channels.items():
        if methods[name] == "gemm-fold":
            continue
        assert np.all(got_taps[name][:, chans] == 0), name  # exactly 0, not merely small
        keep = [c for c in range(got_taps[name].shape[1]) if c not in chans]
        assert np.abs(got_taps[name][:, keep]).max() > 0
        np.testing.assert_allclose(got_taps[name], want_taps[name], rtol=1e-5, atol=1e-5)


def test_no_channels_is_the_identity(load):
    model = load(models.resnet_block())
    taps = find_taps(model)
    for channels in ({}, {t.name: [] for t in taps}):
        new, records = zero_channels(model, taps, channels)
        assert records == []
        assert list(new.graph.node) == list(model.proto.graph.node)
        assert sorted(i.SerializeToString() for i in new.graph.initializer) == \
            sorted(i.SerializeToString() for i in model.proto.graph.initializer)
        x = batch((3, 8, 8))
        for a, b in zip(run(model, new, x), run(model, model.proto, x), strict=True):
            assert a.tobytes() == b.tobytes()


def test_fold_false_masks_every_tap_bitwise_like_the_reference(load):
    model = load(models.plain_cnn())
    taps = find_taps(model)
    channels = {t.name: [1] for t in taps}
    new, records = zero_channels(model, taps, channels, fold=False)
    assert [r.method for r in records] == ["mask", "mask"]
    assert all("[1," in r.detail and "folding disabled" in r.detail for r in records)
    x = batch((3, 8, 8))
    for a, b in zip(run(model, new, x), run(model, mask_reference(model, channels), x), strict=True):
        assert a.tobytes() == b.tobytes()


def test_bn_fold_zeroes_gamma_and_beta_not_just_the_conv(load):
    model = load(models.plain_cnn())
    taps = find_taps(model)
    new, records = zero_channels(model, taps, {"relu1_out": [2, 4]})
    assert records[0].method == "bn-fold" and "BatchNormalization 'bn1'" in records[0].detail
    before, after = inits(model.proto), inits(new)
    for name in ("bn1.scale", "bn1.bias"):
        assert np.all(after[name][[2, 4]] == 0)
        keep = [0, 1, 3, 5]
        assert np.array_equal(after[name][keep], before[name][keep])
    for name in ("conv1.w", "conv1.b", "bn1.mean", "bn1.var"):
        assert np.array_equal(after[name], before[name])

    # Why: zeroing the Conv alone leaves BN(0) = beta - mean * gamma / sqrt(var + eps) != 0.
    naive = onnx.ModelProto()
    naive.CopyFrom(model.proto)
    for init in naive.graph.initializer:
        if init.name in ("conv1.w", "conv1.b"):
            arr = numpy_helper.to_array(init).copy()
            arr[[2, 4]] = 0
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    x = batch((3, 8, 8))
    naive_tap = tap_values(model, naive, ["relu1_out"], x)["relu1_out"]
    assert np.abs(naive_tap[:, [2, 4]]).max() > 0
    assert np.all(tap_values(model, new, ["relu1_out"], x)["relu1_out"][:, [2, 4]] == 0)


def test_residual_merge_masks_and_bn_before_add_folds(load):
    model = load(models.resnet_block())
    taps = find_taps(model, "all+branches")
    x = batch((3, 8, 8))

    merged, rec = zero_channels(model, taps, {"post_relu_out": [0, 5]})
    assert rec[0].method == "mask" and "Mul by [1,8,1,1] mask after 'post_relu_out'" in rec[0].detail
    assert sum(n.op_type == "Mul" for n in merged.graph.node) == 1
    np.testing.assert_allclose(run(model, merged, x)[0],
                               run(model, mask_reference(model, {"post_relu_out": [0, 5]}), x)[0], atol=1e-6)
    # The masked tensor keeps the tap's name, so a re-scan measures the masked map under that name.
    rescanned = dataclasses.replace(model, proto=merged)
    assert [t.name for t in find_taps(rescanned, "all+branches")] == [t.name for t in taps]
    assert np.all(tap_values(model, merged, ["post_relu_out"], x)["post_relu_out"][:, [0, 5]] == 0)

    folded, rec = zero_channels(model, taps, {"bn2_out": [3]})
    assert rec[0].method == "bn-fold" and "'bn2'" in rec[0].detail
    assert len(folded.graph.node) == len(model.proto.graph.node)
    assert inits(folded)["bn2.scale"][3] == 0 and inits(folded)["bn2.bias"][3] == 0
    assert np.array_equal(inits(folded)["c2.w"], inits(model.proto)["c2.w"])
    np.testing.assert_allclose(run(model, folded, x)[0],
                               run(model, mask_reference(model, {"bn2_out": [3]}), x)[0], atol=1e-6)
    assert np.all(tap_values(model, folded, ["bn2_out"], x)["bn2_out"][:, 3] == 0)


def test_affine_constants_after_the_reset_are_zeroed(load):
    model = load(models.affine_chain())
    taps = find_taps(model)
    new, records = zero_channels(model, taps, {"relu1_out": [1], "clip2_out": [0, 4]})
    after, before = inits(new), inits(model.proto)
    assert "Add 'add1'" in records[0].detail
    assert after["add1.b"][0, 1, 0, 0] == 0
    assert np.array_equal(np.delete(after["add1.b"], 1), np.delete(before["add1.b"], 1))
    # The scalar Sub constant became one value per channel, in a new initializer.
    sub = next(n for n in new.graph.node if n.name == "sub2")
    expanded = after[sub.input[1]]
    assert sub.input[1] != "sub2.c" and expanded.shape == (5, 1, 1)
    assert expanded.ravel().tolist() == [0.0, 0.25, 0.25, 0.25, 0.0]
    assert "sub2.c" not in after  # orphaned by the copy: not kept
    assert np.all(after["conv2.w"][[0, 4]] == 0)
    assert np.array_equal(after["mul2.s"], before["mul2.s"])  # 0 * s is already 0


def test_non_zero_preserving_chains_fall_back_to_mask(load):
    model = load(models.non_zero_preserving())
    _, records = zero_channels(model, find_taps(model), {"clip1_out": [0], "sig2_out": [1]})
    reasons = {r.tap: r.detail for r in records}
    assert "Clip 'clip1' does not map 0 to 0" in reasons["clip1_out"]
    assert "Sigmoid 'sig2'" in reasons["sig2_out"]


def test_computed_weights_fall_back_to_mask(load):
    model = load(models.computed_weights())
    new, records = zero_channels(model, find_taps(model), {"relu_out": [2]})
    assert records[0].method == "mask" and "not an initializer" in records[0].detail
    assert inits(new)["w0"].tolist() == inits(model.proto)["w0"].tolist()


def test_shared_initializer_is_copied_not_edited_in_place(load):
    model = load(models.shared_weights())
    new, records = zero_channels(model, find_taps(model), {"relu_a_out": [1, 2]})
    assert records[0].method == "conv-fold" and "'shared.w' copied" in records[0].detail
    conv_a, conv_b = (next(n for n in new.graph.node if n.name == k) for k in ("conv_a", "conv_b"))
    assert conv_b.input[1] == "shared.w" and conv_a.input[1] != "shared.w"
    after, before = inits(new), inits(model.proto)
    assert np.array_equal(after["shared.w"], before["shared.w"])
    assert np.all(after[conv_a.input[1]][[1, 2]] == 0)
    assert np.array_equal(after[conv_a.input[1]][[0, 3]], before["shared.w"][[0, 3]])
    x = batch((4, 6, 6))
    np.testing.assert_allclose(run(model, new, x)[0],
                               run(model, mask_reference(model, {"relu_a_out": [1, 2]}), x)[0], atol=1e-6)


@pytest.mark.parametrize("fold", [True, False])
def test_tap_that_is_a_graph_output_keeps_its_name(load, fold):
    model = load(models.tap_output())
    new, records = zero_channels(model, find_taps(model), {"relu2_out": [0, 3]}, fold=fold)
    assert records[0].method == ("conv-fold" if fold else "mask")
    assert [o.name for o in new.graph.output] == ["fc_out", "relu2_out"]
    x = batch((3, 6, 6))
    logits, features = run(model, new, x)
    assert np.all(features[:, [0, 3]] == 0) and np.abs(features[:, [1, 2, 4]]).max() > 0
    ref_logits, ref_features = run(model, mask_reference(model, {"relu2_out": [0, 3]}), x)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-6)
    np.testing.assert_allclose(features, ref_features, atol=1e-6)


def test_interface_opset_ir_and_metadata_survive_graphsurgeon(load):
    proto = models.plain_cnn(opset=18)
    proto.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    proto.metadata_props.add(key="author", value="tests")
    proto.doc_string, proto.domain, proto.model_version = "a model", "org.example", 7
    proto.producer_version = "1.2"
    proto.graph.node[0].doc_string = "first conv"
    model = load(proto)
    taps = find_taps(model)
    rewrites = [zero_channels(model, taps, {"relu1_out": [0]})[0],
                zero_channels(model, taps, {"relu1_out": [0]}, fold=False)[0],
                clamp_maps(model, {"relu2_out": ClampBound(np.ones((5, 1, 1), np.float32))})[0]]
    for new in rewrites:
        onnx.checker.check_model(new, full_check=True)
        assert new.ir_version == proto.ir_version == 9
        assert list(new.opset_import) == list(proto.opset_import)
        assert list(new.metadata_props) == list(proto.metadata_props)
        assert (new.doc_string, new.domain, new.model_version) == ("a model", "org.example", 7)
        assert (new.producer_name, new.producer_version) == ("onnx-linf-tests", "1.2")
        assert list(new.graph.input) == list(proto.graph.input)
        assert list(new.graph.output) == list(proto.graph.output)
        assert next(n for n in new.graph.node if n.name == "conv1").doc_string == "first conv"


def test_external_data_weights_are_not_folded(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(models.plain_cnn(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    model = load_model(path)
    assert model.has_external_data
    channels = {"relu1_out": [0], "relu2_out": [1, 2]}
    new, records = zero_channels(model, find_taps(model), channels)
    assert [r.method for r in records] == ["mask", "mask"]
    assert all("external data" in r.detail for r in records)
    x = batch((3, 8, 8))
    np.testing.assert_allclose(run(model, new, x)[0], run(model, mask_reference(model, channels), x)[0],
                               atol=1e-6)


def test_unnamed_nodes_still_fold(load):
    proto = models.plain_cnn()
    for node in proto.graph.node:
        node.name = ""
    model = load(proto)
    taps = find_taps(model)
    assert taps[0].chain[0].startswith("#")
    channels = {t.name: [0] for t in taps}
    new, records = zero_channels(model, taps, channels)
    assert [r.method for r in records] == ["bn-fold", "conv-fold"]
    x = batch((3, 8, 8))
    np.testing.assert_allclose(run(model, new, x)[0], run(model, mask_reference(model, channels), x)[0],
                               atol=1e-6)


def test_overlapping_named_taps_edit_one_weight_once(load):
    model = load(models.plain_cnn())
    taps = find_taps(model, ["conv2_out", "relu2_out"])
    channels = {"conv2_out": [0], "relu2_out": [3]}
    new, records = zero_channels(model, taps, channels)
    assert [r.method for r in records] == ["conv-fold", "conv-fold"]
    assert np.all(inits(new)["conv2.w"][[0, 3]] == 0) and np.all(inits(new)["conv2.b"][[0, 3]] == 0)
    x = batch((3, 8, 8))
    np.testing.assert_allclose(run(model, new, x)[0], run(model, mask_reference(model, channels), x)[0],
                               atol=1e-6)


def test_gemm_fold_is_opt_in_and_exact(load):
    model = load(models.resnet_block())
    taps = find_taps(model)
    channels = {"post_relu_out": [1, 6]}
    assert zero_channels(model, taps, channels)[1][0].method == "mask"
    new, records = zero_channels(model, taps, channels, fold_gemm=True)
    assert records[0].method == "gemm-fold" and "Gemm 'fc'" in records[0].detail
    assert len(new.graph.node) == len(model.proto.graph.node)
    assert np.all(inits(new)["fc.w"][:, [1, 6]] == 0)
    x = batch((3, 8, 8))
    np.testing.assert_allclose(run(model, new, x)[0], run(model, mask_reference(model, channels), x)[0],
                               atol=1e-6)


@pytest.mark.parametrize("channels, message", [
    ({"nope": [0]}, "unknown tap 'nope'"),
    ({"relu2_out": [5]}, "channel 5 of tap 'relu2_out' is out of range: the map has 5 channels"),
    ({"relu2_out": [-1]}, "out of range"),
    ({"relu2_out": [1, 2, 1]}, "listed more than once"),
    ({"relu2_out": [1.0]}, "not an integer"),
    ({"relu2_out": [True]}, "not an integer"),
])
def test_bad_requests_raise_one_line_rewrite_errors(load, channels, message):
    model = load(models.plain_cnn())
    with pytest.raises(RewriteError, match=message) as info:
        zero_channels(model, find_taps(model), channels)
    assert "\n" not in str(info.value)


def test_mask_reference_rejects_bad_channels(load):
    model = load(models.plain_cnn())
    with pytest.raises(RewriteError, match="no node"):
        mask_reference(model, {"missing": [0]})
    with pytest.raises(RewriteError, match="bad channel list"):
        mask_reference(model, {"relu2_out": [9]})


# --------------------------------------------------------------------------------------------
# clamp_maps
# --------------------------------------------------------------------------------------------


def test_clamping_at_the_batch_max_leaves_outputs_bitwise_equal(load):
    # Min(a, hi) returns `a` itself wherever a <= hi: no arithmetic, so bit-for-bit equal.
    model = load(models.plain_cnn())
    taps = [t.name for t in find_taps(model)]
    x = batch((3, 8, 8), n=8)
    raw = tap_values(model, model.proto, taps, x)
    before = run(model, model.proto, x)
    per_channel = {n: ClampBound(raw[n].max(axis=(0, 2, 3))[:, None, None]) for n in taps}
    per_position = {n: ClampBound(raw[n].max(axis=0)) for n in taps}
    original = model.proto.SerializeToString()
    for bounds, granularity, elements in ((per_channel, "channel", [6, 5]), (per_position, "position", [384, 320])):
        new, records = clamp_maps(model, bounds)
        assert model.proto.SerializeToString() == original
        onnx.checker.check_model(new, full_check=True)
        assert topologically_sorted(new)
        assert [(r.granularity, r.two_sided, r.elements) for r in records] == \
            [(granularity, False, e) for e in elements]
        for a, b in zip(run(model, new, x), before, strict=True):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("build, shape, tap, bitwise_outputs", [
    (models.nhwc_input, (8, 8, 3), "lrelu_out", True),  # LeakyRelu: negative values
    # BN before the residual Add: the map itself is bitwise unchanged, but ORT fuses Conv+BN+Add
    # in the original model and cannot once Min/Max sit between BN and Add, so the Add's rounding
    # may differ in the last bit.
    (models.resnet_block, (3, 8, 8), "bn2_out", False),
])
def test_two_sided_clamp_at_batch_extremes_is_an_identity(load, build, shape, tap, bitwise_outputs):
    model = load(build())
    x = batch(shape, n=8)
    raw = tap_values(model, model.proto, [tap], x)[tap]
    assert raw.min() < 0
    bound = ClampBound(hi=raw.max(axis=0), lo=raw.min(axis=0))
    new, records = clamp_maps(model, {tap: bound})
    assert records[0].two_sided and records[0].granularity == "position"
    assert [n.op_type for n in new.graph.node].count("Max") == 1
    assert tap_values(model, new, [tap], x)[tap].tobytes() == raw.tobytes()
    for a, b in zip(run(model, new, x), run(model, model.proto, x), strict=True):
        if bitwise_outputs:
            assert a.tobytes() == b.tobytes()
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_values_beyond_the_bounds_are_cut(load):
    model = load(models.nhwc_input())
    x = batch((8, 8, 3), n=8)
    raw = tap_values(model, model.proto, ["lrelu_out"], x)["lrelu_out"]
    hi = (0.5 * raw.max(axis=(0, 2, 3)))[:, None, None].astype(np.float32)
    lo = (0.5 * raw.min(axis=(0, 2, 3)))[:, None, None].astype(np.float32)
    new, _ = clamp_maps(model, {"lrelu_out": ClampBound(hi=hi, lo=lo)})
    clamped = tap_values(model, new, ["lrelu_out"], x)["lrelu_out"]
    assert np.count_nonzero(raw > hi) > 0 and np.count_nonzero(raw < lo) > 0
    assert clamped.tobytes() == np.clip(raw, lo, hi).tobytes()
    assert not np.allclose(run(model, new, x)[0], run(model, model.proto, x)[0])


def test_clamping_a_graph_output_tap_keeps_the_output_name(load):
    model = load(models.tap_output())
    new, _ = clamp_maps(model, {"relu2_out": ClampBound(np.full((5, 1, 1), 0.1, np.float32))})
    assert [o.name for o in new.graph.output] == ["fc_out", "relu2_out"]
    _, features = run(model, new, batch((3, 6, 6)))
    assert features.max() == np.float32(0.1)


@pytest.mark.parametrize("bound, message", [
    (ClampBound(np.ones((4, 1, 1), np.float32)), "has 4 channels, the map has 5"),
    (ClampBound(np.ones((5, 1), np.float32)), r"must be \[C,1,1\] or \[C,H,W\]"),
    (ClampBound(np.ones((5, 4, 4), np.float32)), "spatial shape"),
    (ClampBound(np.full((5, 1, 1), np.nan, np.float32)), "NaN"),
    (ClampBound(np.zeros((5, 1, 1), np.float32), lo=np.ones((5, 1, 1), np.float32)), "lo > hi"),
    (ClampBound(np.ones((5, 1, 1), np.float32), lo=np.zeros((5, 8, 8), np.float32)), "differ in shape"),
])
def test_bad_bounds_raise(load, bound, message):
    model = load(models.plain_cnn())
    with pytest.raises(RewriteError, match=message):
        clamp_maps(model, {"relu2_out": bound})


def test_clamp_unknown_tap_raises(load):
    model = load(models.plain_cnn())
    with pytest.raises(RewriteError, match="unknown tap 'nope'"):
        clamp_maps(model, {"nope": ClampBound(np.ones((5, 1, 1), np.float32))})


@pytest.mark.parametrize("rewrite", ["mask", "clamp"])
def test_subgraph_readers_of_a_tap_see_the_rewritten_map(load, rewrite):
    model = load(models.subgraph_reader())
    if rewrite == "mask":
        new, records = zero_channels(model, find_taps(model), {"sig1_out": [1, 2]})
        assert records[0].method == "mask"
    else:
        new, _ = clamp_maps(model, {"sig1_out": ClampBound(np.full((4, 1, 1), 0.25, np.float32))})
    onnx.checker.check_model(new, full_check=True)
    # Expose the If's output (computed inside the branch from the outer-scope tap).
    new.graph.output.append(helper.make_tensor_value_info("if_out", onnx.TensorProto.FLOAT, None))
    x = np.abs(batch((3, 6, 6)))  # positive input: the Relu branch runs, if_out = sig1_out
    _, if_out = run(model, new, x)
    if rewrite == "mask":
        assert np.all(if_out[:, [1, 2]] == 0) and np.all(if_out[:, [0, 3]] > 0)
    else:
        assert if_out.max() == np.float32(0.25)
