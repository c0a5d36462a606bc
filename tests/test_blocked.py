"""The blocked CPU artefact computes what the portable clamped model computes, with fewer reorders."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_linf.errors import RewriteError
from onnx_linf.model.load import load_model
from onnx_linf.rewrite.blocked import BLOCK_KEY, _to_blocked, blocked_artifact, nchwc_block_size
from onnx_linf.rewrite.clamp import SCORE_OUTPUT, ClampBound, MeanBound, clamp_maps

BLOCK = nchwc_block_size()
needs_nchwc = pytest.mark.skipif(BLOCK is None, reason="this ONNX Runtime CPU provider has no NCHWc layout")
C, S = 32, 8


def conv_net(tmp_path, opset=17):
    """input -> Conv -> Relu (a) -> Conv (b, signed) -> Relu -> Conv -> Relu (c) -> GAP -> Gemm."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name) for name, shape in
             (("w1", (C, 3, 3, 3)), ("w2", (C, C, 3, 3)), ("w3", (C, C, 1, 1)), ("fc", (10, C)))]
    inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "fcb"))
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["b"], pads=[1] * 4),
             helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("Conv", ["rb", "w3"], ["c3"]),
             helper.make_node("Relu", ["c3"], ["c"]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1)]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, S, S])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    graph = helper.make_graph(nodes, "net", [x], [y], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.save(proto, tmp_path / "net.onnx")
    return load_model(tmp_path / "net.onnx")


def maps(model, x):
    """The raw maps a, b, c on `x` (float32), from the unmodified model."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    proto.graph.output.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in "abc"])
    out = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(list("abc"),
                                                                                                    {"input": x})
    return dict(zip("abc", out))


def test_blocked_order_matches_the_index_formula():
    """Element (c, h, w) of a [C,H,W] constant sits at ((c // B) * H * W + h * W + w) * B + c % B."""
    rng = np.random.default_rng(1)
    for block in (4, 8, 16):
        c, h, w = 2 * block, 3, 5
        x = rng.normal(size=(c, h, w)).astype(np.float32)
        flat = _to_blocked(x, (c, h, w), block).reshape(-1)
        ci, hi, wi = np.meshgrid(np.arange(c), np.arange(h), np.arange(w), indexing="ij")
        index = ((ci // block) * h * w + hi * w + wi) * block + ci % block
        np.testing.assert_array_equal(flat[index], x)
        per_channel = rng.normal(size=(c, 1, 1)).astype(np.float32)
        np.testing.assert_array_equal(_to_blocked(per_channel, (c, h, w), block).reshape(-1)[index],
                                      np.broadcast_to(per_channel, (c, h, w)))
        assert _to_blocked(np.float32(2.0), (c, h, w), block).shape == ()
        assert _to_blocked(np.ones((c, h, 1), np.float32), (c, h, w), block) is None


@needs_nchwc
def test_artefact_matches_the_portable_model_where_bounds_bind(tmp_path):
    model = conv_net(tmp_path)
    rng = np.random.default_rng(2)
    calib = rng.normal(0, 1, (16, 3, S, S)).astype(np.float32)
    m = maps(model, calib)
    bounds = {
        "a": ClampBound(hi=m["a"].max(axis=0), mean=MeanBound(m["a"].mean(axis=(2, 3)).max(axis=0), power=6.0,
                                                                eps=1e-3)),
        "b": ClampBound(hi=m["b"].max(axis=0), lo=m["b"].min(axis=0),
                        mean=MeanBound(np.maximum(m["b"], 0).mean(axis=(2, 3)).max(axis=0), power=6.0, eps=1e-3,
                                       positive=True)),
        "c": ClampBound(hi=m["c"].max(axis=0)),
    }
    proto, _ = clamp_maps(model, bounds)
    result = blocked_artifact(proto, check=[{"input": calib}, {"input": 3 * calib}])
    assert result.block == BLOCK
    assert dict((p.key, p.value) for p in result.proto.metadata_props)[BLOCK_KEY] == str(BLOCK)
    assert result.reorders_after < result.reorders_before and result.blocked_ops > 0
    portable = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    artefact = ort.InferenceSession(result.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    # Clean images, images 3x brighter (every bound binds somewhere), and a patch.
    x = np.concatenate([calib[:4], 3 * rng.normal(0, 1, (4, 3, S, S)).astype(np.float32), calib[4:6]])
    x[-2:, :, 2:5, 2:5] = 6.0
    want = portable.run(None, {"input": x})[0]
    got = artefact.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    plain = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert not np.allclose(plain.run(None, {"input": x[4:]})[0], want[4:], rtol=1e-3)  # the bounds did act
    np.testing.assert_allclose(got[:4], plain.run(None, {"input": x[:4]})[0], rtol=1e-5, atol=1e-5)


@needs_nchwc
@pytest.mark.parametrize("opset", [17, 18])  # ReduceMax's axes: an attribute, then an input
def test_score_output_runs_on_the_blocked_maps(tmp_path, opset):
    """The score's position part (a ReduceMax over C, H and W) reads the blocked map: no reorder is
    added for it, and the score is the portable model's."""
    model = conv_net(tmp_path, opset)
    rng = np.random.default_rng(5)
    calib = rng.normal(0, 1, (16, 3, S, S)).astype(np.float32)
    m = maps(model, calib)
    bounds = {t: ClampBound(hi=m[t].max(axis=0), mean=MeanBound(np.maximum(m[t], 0).mean(axis=(2, 3)).max(axis=0),
                                                                  power=6.0, eps=1e-3, positive=t == "b"),
                            lo=m[t].min(axis=0) if t == "b" else None) for t in "abc"}
    without, _ = clamp_maps(model, bounds)
    proto, _ = clamp_maps(model, bounds, score_output=True)
    plain, scored = blocked_artifact(without), blocked_artifact(proto)
    assert scored.reorders_after == plain.reorders_after < scored.reorders_before
    x = np.concatenate([calib[:4], 3 * rng.normal(0, 1, (4, 3, S, S)).astype(np.float32)])
    x[-2:, :, 2:5, 2:5] = 6.0
    names = [o.name for o in proto.graph.output]
    want = dict(zip(names, ort.InferenceSession(proto.SerializeToString(),
                                                providers=["CPUExecutionProvider"]).run(names, {"input": x})))
    got = dict(zip(names, ort.InferenceSession(scored.proto.SerializeToString(),
                                               providers=["CPUExecutionProvider"]).run(names, {"input": x})))
    assert want[SCORE_OUTPUT].shape == (8,) and (want[SCORE_OUTPUT][4:] > 0).all()  # bounds were exceeded
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5 * float(np.abs(want[name]).max()))


@needs_nchwc
def test_model_without_blocked_maps_is_returned_working(tmp_path):
    """A model whose maps ORT keeps in NCHW (3 channels): nothing to move, the artefact still runs."""
    nodes = [helper.make_node("Relu", ["input"], ["a"]), helper.make_node("Identity", ["a"], ["output"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3, 4, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    model = load_model(tmp_path / "m.onnx")
    proto, _ = clamp_maps(model, {"a": ClampBound(hi=np.full((3, 4, 4), 0.5, np.float32))})
    result = blocked_artifact(proto)
    assert result.blocked_ops == 0
    x = np.random.default_rng(3).normal(size=(2, 3, 4, 4)).astype(np.float32)
    got = ort.InferenceSession(result.proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None,
                                                                                                          {"input": x})
    np.testing.assert_array_equal(got[0], np.minimum(np.maximum(x, 0), 0.5))


@needs_nchwc
def test_check_refuses_an_artefact_that_disagrees(tmp_path, monkeypatch):
    """A wrong block order (as on a CPU with another block size) is caught by the check feeds."""
    import onnx_linf.rewrite.blocked as blocked

    model = conv_net(tmp_path)
    calib = np.random.default_rng(4).normal(0, 1, (8, 3, S, S)).astype(np.float32)
    m = maps(model, calib)
    proto, _ = clamp_maps(model, {"a": ClampBound(hi=m["a"].max(axis=0))})
    monkeypatch.setattr(blocked, "nchwc_block_size", lambda: BLOCK // 2)
    with pytest.raises(RewriteError, match="differs from the portable model"):
        blocked.blocked_artifact(proto, check=[{"input": 3 * calib}])
