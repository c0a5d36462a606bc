"""The channel-mean bound and the score output equal a numpy reference on random maps.

Graph under test (the map is the model input passed through an op, so any values can be fed):

    input [N,C,H,W] --Identity--> a --(channel-mean bound, position clamp)--> a' --Identity--> output
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_linf.errors import RewriteError
from onnx_linf.measure.session import create_session
from onnx_linf.model.load import Model, load_model
from onnx_linf.rewrite.clamp import SCORE_OUTPUT, SCORE_PARTS_OUTPUT, ClampBound, MeanBound, clamp_maps

C, H, W = 4, 5, 6


def identity_model(tmp_path, opset: int) -> Model:
    nodes = [helper.make_node("Identity", ["input"], ["a"], name="make_map"),
             helper.make_node("Identity", ["a"], ["output"], name="read_map")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", C, H, W])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", C, H, W])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.save(proto, tmp_path / "identity.onnx")
    return load_model(tmp_path / "identity.onnx")


def reference(a, mean_hi, power, eps, positive, hi, lo, response="clip"):
    """numpy form of the rewrite (float64), and the per-image score."""
    a = a.astype(np.float64)
    src = np.maximum(a, 0) if positive else a
    mu = src.mean(axis=(2, 3), keepdims=True)
    ratio = np.maximum(mean_hi, eps).reshape(1, -1, 1, 1) / np.maximum(mu, eps)
    factor = np.minimum(ratio, 1.0)
    out = a * factor ** power
    mean_score = np.maximum(-np.log(ratio), 0).reshape(len(a), -1).max(axis=1)
    excess = np.maximum(out - hi, 0)
    if lo is not None:
        excess = np.maximum(excess, np.maximum(lo - out, 0))
    size = np.abs(hi).reshape(C, -1).max(axis=1)
    if lo is not None:
        size = np.maximum(size, np.abs(lo).reshape(C, -1).max(axis=1))
    pos_score = (excess / np.maximum(size, 1e-3).reshape(1, C, 1, 1)).reshape(len(a), -1).max(axis=1)
    if response == "fold":  # reflected at hi, floored at lo (0 for a one-sided bound)
        out = np.maximum(np.where(out > hi, 2 * hi - out, out), 0.0 if lo is None else lo)
    out = np.minimum(out, hi)
    if lo is not None:
        out = np.maximum(out, lo)
    return out, np.stack([mean_score, pos_score], axis=1)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("power", [1.0, 2.0, 3.0, 1.5, 6.0, 7.0])
@pytest.mark.parametrize("positive,two_sided", [(False, False), (True, True)])
@pytest.mark.parametrize("excess", ["clip", "fold"])
def test_rewrite_equals_numpy_reference(tmp_path, opset, power, positive, two_sided, excess):
    rng = np.random.default_rng(int(power * 10) + opset)
    a = rng.normal(0.5, 1.0, (7, C, H, W)).astype(np.float32)
    if not positive:
        a = np.abs(a)
    a[2, 1] *= 6.0   # one image drives channel 1 far above its clean mean
    a[3] = 0.0       # an all-zero image: every mean below eps
    mean_hi = np.array([0.9, 1.0, 0.0, 2.0], np.float32)  # channel 2 "dead on clean images"
    hi = rng.uniform(1.0, 3.0, (C, H, W)).astype(np.float32)
    lo = -rng.uniform(0.5, 2.0, (C, H, W)).astype(np.float32) if two_sided else None
    eps = 1e-3
    model = identity_model(tmp_path, opset)
    bound = ClampBound(hi=hi, lo=lo, mean=MeanBound(mean_hi, power=power, eps=eps, positive=positive))
    scales = (0.5, 4.0)
    proto, records = clamp_maps(model, {"a": bound}, score_output=True, score_parts=True, score_scales=scales,
                                excess=excess)
    onnx.checker.check_model(proto, full_check=True)
    assert [o.name for o in proto.graph.output] == ["output", SCORE_OUTPUT, SCORE_PARTS_OUTPUT]
    assert records[0].mean_bound and records[0].two_sided == two_sided
    assert records[0].score_parts == ("mean", "position")
    got, score, parts = create_session(model, proto, "cpu").run(None, a)
    want, want_parts = reference(a, mean_hi, power, eps, positive, hi, lo, excess)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
    assert score.shape == (7,) and score.dtype == np.float32 and parts.shape == (7, 2)
    np.testing.assert_allclose(parts, want_parts, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(score, (want_parts / np.array(scales)).max(axis=1), rtol=1e-4, atol=1e-6)
    assert score[2] > 1.0  # the image that drove channel 1 scores high


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("positive", [False, True])
def test_low_part_equals_numpy_reference_and_changes_no_value(tmp_path, opset, positive):
    """With a low reference L the map gets a third part, max_c relu(log(max(L, eps) / max(mu, eps))),
    between the mean part and the position part; the rewritten values are exactly those without it."""
    rng = np.random.default_rng(opset + positive)
    a = np.abs(rng.normal(1.0, 0.3, (6, C, H, W))).astype(np.float32)
    if positive:
        a -= 0.2  # a signed map: the parts read the mean of its positive part
    a[1, 3] *= 0.1   # one channel far below its clean minimum
    a[4] = 0.0       # every mean below eps: only channels with a live minimum give evidence
    eps = 1e-3
    mean_hi = np.full(C, 2.0, np.float32)
    low = np.array([0.5, 0.0, 0.6, 0.7], np.float32)  # channel 1: minimum 0, never evidence
    hi = np.full((C, H, W), 10.0, np.float32)
    model = identity_model(tmp_path, opset)
    with_low = ClampBound(hi=hi, mean=MeanBound(mean_hi, power=2.0, eps=eps, positive=positive, lo=low))
    proto, records = clamp_maps(model, {"a": with_low}, score_output=True, score_parts=True,
                                score_scales=(1.0, 0.5, 1.0))
    onnx.checker.check_model(proto, full_check=True)
    assert records[0].score_parts == ("mean", "low", "position")
    got, score, parts = create_session(model, proto, "cpu").run(None, a)
    src = np.maximum(a, 0) if positive else a
    mu = src.astype(np.float64).mean(axis=(2, 3))
    want_low = np.maximum(np.log(np.maximum(low, eps) / np.maximum(mu, eps)), 0).max(axis=1)
    want, want_parts = reference(a, mean_hi, 2.0, eps, positive, hi, None)
    np.testing.assert_allclose(parts[:, 1], want_low, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts[:, [0, 2]], want_parts, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(score, (parts / np.array([1.0, 0.5, 1.0])).max(axis=1), rtol=1e-6)
    assert parts[1, 1] > 1.5 and parts[4, 1] > 5.0  # the suppressed channel, the all-zero image
    plain, _ = clamp_maps(model, {"a": ClampBound(hi=hi, mean=MeanBound(mean_hi, power=2.0, eps=eps,
                                                                          positive=positive))})
    np.testing.assert_array_equal(got, create_session(model, plain, "cpu").run(None, a)[0])
    with pytest.raises(RewriteError, match="low reference"):
        clamp_maps(model, {"a": ClampBound(hi=hi, mean=MeanBound(mean_hi, lo=np.full(C, -1.0, np.float32)))},
                   score_output=True)


def test_gate_reads_the_low_parts_with_their_own_threshold(tmp_path):
    """An image whose channel means fall far below the clean minimum is flagged by the gate when it
    has a low threshold (and the bound a low reference): the scaled low parts are summed on their
    own, not added to the upper side's evidence."""
    model = identity_model(tmp_path, 18)
    a = np.ones((3, C, H, W), np.float32)
    a[1, 0] = 0.2            # log(0.8 / 0.2) = 1.39 below channel 0's minimum
    a[2, 0] = 0.7            # log(0.8 / 0.7) = 0.13: scaled 0.27, below the low threshold
    mean_hi = np.full(C, 1.5, np.float32)
    low = np.full(C, 0.8, np.float32)
    gate_hi = np.full(C, 0.5, np.float32)
    bound = ClampBound(hi=None, mean=MeanBound(mean_hi, power=1.0, eps=1e-3, gate_hi=gate_hi, lo=low))
    proto, _ = clamp_maps(model, {"a": bound}, score_scales=(0.5, 0.5), gate_threshold=1.0, gate_low_threshold=1.0)
    onnx.checker.check_model(proto, full_check=True)
    out = create_session(model, proto, "cpu").run(None, a)[0]
    np.testing.assert_array_equal(out[[0, 2]], a[[0, 2]])
    np.testing.assert_allclose(out[1, 1:], 0.5, rtol=1e-6)  # gated: every channel above 0.5 pulled to it
    # The low side above a threshold of its own only: no low threshold, or no reference, no flag.
    proto, _ = clamp_maps(model, {"a": bound}, score_scales=(0.5, 0.5), gate_threshold=1.0)
    np.testing.assert_array_equal(create_session(model, proto, "cpu").run(None, a)[0], a)
    without = dataclasses.replace(bound, mean=dataclasses.replace(bound.mean, lo=None))
    proto, _ = clamp_maps(model, {"a": without}, score_scales=(0.5,), gate_threshold=1.0, gate_low_threshold=1.0)
    np.testing.assert_array_equal(create_session(model, proto, "cpu").run(None, a)[0], a)
    with pytest.raises(RewriteError, match="low gate threshold needs"):
        clamp_maps(model, {"a": bound}, gate_low_threshold=1.0)


def test_graded_mean_part_and_gate_output(tmp_path):
    """With a reference R below the bound B the mean part is max_c relu(log(max(mu, eps) / max(R, eps))),
    graded where the bound alone reads 0; the scaled values do not change; `gate_output` names the
    images the gate flagged, and they are exactly the ones whose output changed."""
    rng = np.random.default_rng(11)
    a = np.abs(rng.normal(1.0, 0.2, (6, C, H, W))).astype(np.float32)
    a[2, 1] *= 1.5  # above the reference, below the bound: graded evidence only
    a[4, 0] *= 3.0  # above both
    eps = 1e-3
    mu = a.astype(np.float64).mean(axis=(2, 3))
    bound_hi = (mu.max(axis=0) * 1.01).astype(np.float32)
    bound_hi[0] = np.float32(mu[:, 0].max() / 2)  # image 4's channel 0 passes the bound, no other image does
    ref = np.full(C, 1.05, np.float32)
    model = identity_model(tmp_path, 18)
    graded = ClampBound(hi=None, mean=MeanBound(bound_hi, power=2.0, eps=eps, ref=ref, gate_hi=ref * 0.5))
    proto, records = clamp_maps(model, {"a": graded}, score_output=True, score_parts=True)
    got, _, parts = create_session(model, proto, "cpu").run(None, a)
    want = np.maximum(np.log(np.maximum(mu, eps) / np.maximum(ref, eps)), 0).max(axis=1)
    np.testing.assert_allclose(parts[:, 0], want, rtol=1e-5, atol=1e-6)
    assert parts[2, 0] > 0.3
    plain, _ = clamp_maps(model, {"a": ClampBound(hi=None, mean=MeanBound(bound_hi, power=2.0, eps=eps))})
    np.testing.assert_array_equal(got, create_session(model, plain, "cpu").run(None, a)[0])
    # The gate reads the graded part: threshold 0.3 flags images 2 and 4.
    flagged, _ = clamp_maps(model, {"a": graded}, gate_threshold=0.3, gate_output=True)
    out, gated = create_session(model, flagged, "cpu").run(None, a)
    assert gated.dtype == np.bool_ and gated.tolist() == (parts[:, 0] > 0.3).tolist()
    assert gated[[2, 4]].all()
    ungated = create_session(model, plain, "cpu").run(None, a)[0]
    np.testing.assert_array_equal(out[~gated], ungated[~gated])
    assert all((out[i] != ungated[i]).any() for i in np.flatnonzero(gated))
    with pytest.raises(RewriteError, match="gate output needs"):
        clamp_maps(model, {"a": graded}, gate_output=True)


def test_in_bounds_images_are_unchanged_bitwise_and_score_zero(tmp_path):
    """mu <= B everywhere: the factor is exactly 1, a * 1 == a, and the score is 0 (its floor)."""
    rng = np.random.default_rng(0)
    a = np.abs(rng.normal(0, 1, (9, C, H, W))).astype(np.float32)
    mean_hi = a.mean(axis=(2, 3)).max(axis=0)
    model = identity_model(tmp_path, 17)
    proto, _ = clamp_maps(model, {"a": ClampBound(hi=a.max(axis=0), mean=MeanBound(mean_hi * 1.001))},
                          score_output=True)
    got, score = create_session(model, proto, "cpu").run(None, a)
    np.testing.assert_array_equal(got, a)
    np.testing.assert_array_equal(score, np.zeros(9, np.float32))


def test_mean_bound_alone_and_bad_bounds(tmp_path):
    model = identity_model(tmp_path, 17)
    a = np.ones((2, C, H, W), np.float32) * np.array([1, 2, 3, 4], np.float32).reshape(1, C, 1, 1)
    proto, records = clamp_maps(model, {"a": ClampBound(hi=None, mean=MeanBound(np.full(C, 2.0, np.float32),
                                                                                  power=1.0))})
    got = create_session(model, proto, "cpu").run(None, a)[0]
    np.testing.assert_allclose(got[0, :, 0, 0], [1, 2, 2, 2], rtol=1e-6)  # means above 2 pulled to 2
    assert records[0].granularity == "none" and records[0].elements == 0
    with pytest.raises(RewriteError, match="finite values"):
        clamp_maps(model, {"a": ClampBound(hi=None, mean=MeanBound(np.full(C, np.nan, np.float32)))})
    with pytest.raises(RewriteError, match="nothing to apply"):
        clamp_maps(model, {"a": ClampBound(hi=None)})
    with pytest.raises(RewriteError, match="power must be > 0|eps and power"):
        clamp_maps(model, {"a": ClampBound(hi=None, mean=MeanBound(np.ones(C, np.float32), power=0))})


def test_input_model_untouched(tmp_path):
    model = identity_model(tmp_path, 17)
    before = model.proto.SerializeToString()
    clamp_maps(model, {"a": ClampBound(hi=np.ones((C, 1, 1), np.float32), mean=MeanBound(np.ones(C, np.float32)))},
               score_output=True)
    assert model.proto.SerializeToString() == before


def straightforward_factor_model(channels: int, mean_hi: np.ndarray, eps: float, power: float) -> bytes:
    """The channel-mean bound as first written: ``a * Pow(Min(B' / Max(mu, eps), 1), p)``, B' = max(B, eps)."""
    def f32(name, v):
        return helper.make_tensor(name, TensorProto.FLOAT, np.shape(v), np.asarray(v, np.float32).ravel())

    nodes = [helper.make_node("GlobalAveragePool", ["a"], ["mu"]),
             helper.make_node("Max", ["mu", "eps"], ["floor"]),
             helper.make_node("Div", ["num", "floor"], ["ratio"]),
             helper.make_node("Min", ["ratio", "one"], ["factor"]),
             helper.make_node("Pow", ["factor", "p"], ["scale"]),
             helper.make_node("Mul", ["a", "scale"], ["out"])]
    inits = [f32("eps", eps), f32("num", np.maximum(mean_hi, eps).reshape(1, channels, 1, 1)), f32("one", 1.0),
             f32("p", power)]
    shape = ["N", channels, H, W]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


@pytest.mark.parametrize("power", [1.0, 2.0, 4.0, 6.0, 1.5])
def test_factor_form_equals_the_straightforward_form(tmp_path, power):
    """B' / Max(mu, B') and the power by repeated squaring against Min(B' / Max(mu, eps), 1) and Pow:
    bit for bit where the factor is 1 (means in bounds, all-zero images) and for p = 1 and fractional p;
    within a few float32 ulps of the factor where it scales (products instead of std::pow)."""
    import onnxruntime as ort

    rng = np.random.default_rng(int(power * 10))
    channels = 64
    a = np.abs(rng.normal(0.5, 1.0, (12, channels, H, W))).astype(np.float32)
    a[3] = 0.0
    a[4, :7] *= rng.uniform(1.5, 40.0, (7, 1, 1)).astype(np.float32)  # some channels over their bound
    mean_hi = a[5:].mean(axis=(2, 3)).max(axis=0) * 1.001
    mean_hi[:3] = 0.0  # channels dead on clean images: B below eps
    nodes = [helper.make_node("Identity", ["input"], ["a"]), helper.make_node("Identity", ["a"], ["output"])]
    shape = ["N", channels, H, W]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    model = load_model(tmp_path / "m.onnx")
    proto, _ = clamp_maps(model, {"a": ClampBound(hi=None, mean=MeanBound(mean_hi, power=power, eps=1e-3))})
    ops = [node.op_type for node in proto.graph.node]
    assert ("Pow" in ops) == (power != int(power)) and "Min" not in ops
    got = create_session(model, proto, "cpu").run(None, a)[0]
    want = ort.InferenceSession(straightforward_factor_model(channels, mean_hi, 1e-3, power),
                                providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    mu = a.mean(axis=(2, 3), keepdims=True)
    inside = np.broadcast_to(mu <= np.maximum(mean_hi, 1e-3).reshape(1, -1, 1, 1), a.shape)
    assert (~inside).any() and inside.any()
    np.testing.assert_array_equal(got[inside], want[inside])
    np.testing.assert_array_equal(got[inside], a[inside])
    if power == int(power) and power > 2:
        np.testing.assert_allclose(got, want, rtol=8 * np.finfo(np.float32).eps, atol=0)
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("opset", [13, 18])
def test_score_gate_tightens_only_the_flagged_images(tmp_path, opset):
    """Images whose (scaled) score passes the gate's threshold get the gate bound's factor; every
    other image comes out bit for bit as without the gate."""
    rng = np.random.default_rng(5)
    a = np.abs(rng.normal(0.5, 0.3, (8, C, H, W))).astype(np.float32)
    a[1, 0] *= 4.0   # far above channel 0's mean bound: flagged
    a[5, 2] *= 1.2   # slightly above channel 2's bound: scaled, but below the gate threshold
    mean_hi = a[[0, 2, 3, 4, 6, 7]].mean(axis=(2, 3)).max(axis=0) * 1.001
    gate_hi = mean_hi * 0.5
    hi = a.max(axis=0) * 2
    hi[3, 0, 0] = a[6, 3, 0, 0] * 0.1  # image 6 leaves one position far behind: only the position part sees it
    model = identity_model(tmp_path, opset)
    plain = ClampBound(hi=hi, mean=MeanBound(mean_hi, power=2.0, eps=1e-3))
    gated = ClampBound(hi=hi, mean=MeanBound(mean_hi, power=2.0, eps=1e-3, gate_hi=gate_hi))
    scales = (0.4, 0.01)  # the position part scaled up: it must still not gate (the gate reads mean parts)
    threshold = 1.0
    p0, _ = clamp_maps(model, {"a": plain}, score_output=True, score_scales=scales)
    p1, _ = clamp_maps(model, {"a": gated}, score_output=True, score_scales=scales, gate_threshold=threshold)
    onnx.checker.check_model(p1, full_check=True)
    out0, score0 = create_session(model, p0, "cpu").run(None, a)
    out1, score1 = create_session(model, p1, "cpu").run(None, a)
    mu = a.astype(np.float64).mean(axis=(2, 3), keepdims=True)
    mean_part = np.maximum(np.log(np.maximum(mu, 1e-3) / np.maximum(mean_hi, 1e-3).reshape(1, C, 1, 1)), 0)
    flagged = mean_part.reshape(8, -1).max(axis=1) / scales[0] > threshold
    assert flagged.tolist() == [False, True, False, False, False, False, False, False]
    np.testing.assert_array_equal(out1[~flagged], out0[~flagged])
    g = np.minimum(np.maximum(gate_hi, 1e-3).reshape(1, C, 1, 1) / np.maximum(mu, 1e-3), 1.0) ** 2.0
    want = np.minimum(a * g, hi)
    np.testing.assert_allclose(out1[flagged], want[flagged], rtol=2e-5, atol=1e-6)
    assert (out1[1] < out0[1]).any()
    assert score0[6] > threshold  # the score sees image 6; the gate leaves it to the position clamp
    np.testing.assert_array_equal(score1[~flagged], score0[~flagged])
    # Without the score output the gate builds no score nodes (no full-size position part) and
    # clamps the same way.
    p2, _ = clamp_maps(model, {"a": gated}, score_scales=scales, gate_threshold=threshold)
    assert [o.name for o in p2.graph.output] == ["output"]
    assert not any(o.endswith("pos_score") for node in p2.graph.node for o in node.output)
    np.testing.assert_array_equal(create_session(model, p2, "cpu").run(None, a)[0], out1)
    with pytest.raises(RewriteError, match="gate threshold"):
        clamp_maps(model, {"a": gated}, gate_threshold=float("nan"))


def test_fold_reflects_values_above_the_bound_and_leaves_the_rest_bitwise(tmp_path):
    """excess='fold': a value above hi comes out as 2 hi - value (floored at 0 for a one-sided bound,
    at lo for a two-sided one); every value at or below hi is returned bit for bit; clip keeps hi."""
    model = identity_model(tmp_path, 17)
    hi = np.full((C, H, W), 2.0, np.float32)
    a = np.abs(np.random.default_rng(5).normal(0, 1, (3, C, H, W))).astype(np.float32)
    a[0, 0, 0, :4] = [2.0, 2.5, 3.5, 10.0]  # at the bound, a little above, 1.75x, far above
    folded = create_session(model, clamp_maps(model, {"a": ClampBound(hi=hi)}, excess="fold")[0], "cpu").run(None, a)[0]
    clipped = create_session(model, clamp_maps(model, {"a": ClampBound(hi=hi)})[0], "cpu").run(None, a)[0]
    np.testing.assert_array_equal(folded[0, 0, 0, :4], np.array([2.0, 1.5, 0.5, 0.0], np.float32))
    np.testing.assert_array_equal(clipped[0, 0, 0, :4], np.array([2.0, 2.0, 2.0, 2.0], np.float32))
    inside = a <= hi
    np.testing.assert_array_equal(folded[inside], a[inside])
    lo = np.full((C, H, W), -1.0, np.float32)
    two = create_session(model, clamp_maps(model, {"a": ClampBound(hi=hi, lo=lo)}, excess="fold")[0], "cpu")
    np.testing.assert_array_equal(two.run(None, a)[0][0, 0, 0, :4], np.array([2.0, 1.5, 0.5, -1.0], np.float32))
    with pytest.raises(RewriteError, match="excess must be one of clip, fold"):
        clamp_maps(model, {"a": ClampBound(hi=hi)}, excess="reflect")


def test_gate_sums_the_scaled_mean_parts_over_the_maps_so_far(tmp_path):
    """The gate's evidence at a map is the sum of the scaled channel-mean parts of that map and the
    earlier ones: an image moderately above its bounds at two maps is flagged at the second (and
    only there), one above at one map only is not, one far above at the first is flagged at both."""
    nodes = [helper.make_node("Split", ["input"], ["a", "b"], name="split", axis=1, num_outputs=2),
             helper.make_node("Concat", ["a", "b"], ["output"], name="join", axis=1)]
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 2 * C, H, W]) for name in ("input", "output")]
    graph = helper.make_graph(nodes, "g", io[:1], io[1:])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.save(proto, tmp_path / "two.onnx")
    model = load_model(tmp_path / "two.onnx")
    base = np.ones((4, 2 * C, H, W), np.float32)
    mean_hi = np.ones(C, np.float32)
    scale, threshold = 0.5, 1.0  # a part of 0.3 scores 0.6: below the threshold alone, above it twice
    up = np.float32(np.exp(0.3))
    x = base.copy()
    x[0, 0], x[0, C] = up, up   # 0.6 + 0.6: flagged at b only
    x[1, 0] = up                # 0.6 at a, nothing at b: never flagged
    x[2, 0] = np.float32(np.exp(0.6))  # 1.2 at a: flagged at a (and so at b)
    bound = ClampBound(hi=None, mean=MeanBound(mean_hi, power=1.0, eps=1e-3, gate_hi=mean_hi * 0.5))
    proto, _ = clamp_maps(model, {"a": bound, "b": bound}, score_scales=(scale, scale), gate_threshold=threshold)
    out = create_session(model, proto, "cpu").run(None, x)[0]
    plain, _ = clamp_maps(model, {"a": dataclasses.replace(bound, mean=dataclasses.replace(bound.mean, gate_hi=None)),
                                  "b": dataclasses.replace(bound, mean=dataclasses.replace(bound.mean, gate_hi=None))})
    ref = create_session(model, plain, "cpu").run(None, x)[0]
    gated_a = ~np.isclose(out[:, :C], ref[:, :C]).all(axis=(1, 2, 3))
    gated_b = ~np.isclose(out[:, C:], ref[:, C:]).all(axis=(1, 2, 3))
    assert gated_a.tolist() == [False, False, True, False]
    assert gated_b.tolist() == [True, False, True, False]
    np.testing.assert_array_equal(out[[1, 3]], ref[[1, 3]])
    np.testing.assert_allclose(out[0, C + 1], 0.5, rtol=1e-6)  # gated at b: every channel pulled to 0.5
