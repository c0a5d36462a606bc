"""Hostile models for issue 12: each reproduces one defect a real model exposed (seeded, built in code).

Every builder returns an `onnx.ModelProto` that the ONNX checker accepts. Sketches use NCHW unless
stated. The defect each one guards is in its docstring; tests/test_robustness.py holds the tests.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models import GraphBuilder, plain_cnn


def _finish(g: GraphBuilder, x_shape: list, out: str, out_shape: list, *, opset: int, ir: int,
            input_name: str = "input", check: bool = True) -> onnx.ModelProto:
    graph = helper.make_graph(
        g.nodes, "hostile",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    model.producer_name = "onnx-linf-hostile"
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def _small_cnn(g: GraphBuilder, x: str = "input", cin: int = 3) -> str:
    """conv(cin->6) -> BN -> Relu -> conv(6->5) -> Relu -> GAP -> Flatten -> Gemm(5->4)."""
    x = g.node("Relu", [g.bn(g.conv(x, cin, 6, "conv1"), 6, "bn1")], "relu1")
    x = g.node("Relu", [g.conv(x, 6, 5, "conv2")], "relu2")
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x], "gap")], "flatten", axis=1)
    return g.gemm(x, 5, 4, "fc")


def ir3_with_initializer_inputs_batch1(opset: int = 9) -> onnx.ModelProto:
    """IR version 3, every initializer ALSO listed as a graph input, fixed batch 1 (model-zoo style)::

        input[1,3,8,8] -> conv1 -> bn1 -> relu1 -> conv2 -> relu2 -> GAP -> Flatten -> Gemm -> [1,4]
        graph.input = [input, conv1.w, conv1.b, bn1.scale, ..., fc.b]   (IR < 4 rule)

    Guards defect 1: a rewrite must list every initializer it adds among the graph inputs (the IR < 4
    checker rule: "... in initializer but not in graph input"), and verification must pad / split
    its inputs to the fixed batch of 1 like scan does.
    """
    g = GraphBuilder(31)
    out = _small_cnn(g)
    model = _finish(g, [1, 3, 8, 8], out, [1, 4], opset=opset, ir=3, check=False)
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    onnx.checker.check_model(model, full_check=True)
    return model


def huge_declared_input() -> onnx.ModelProto:
    """A valid tiny CNN whose input *declares* 1 x 3 x 200000 x 200000::

        input[1,3,200000,200000] -> conv(3->4) -> Relu -> GAP -> Flatten -> Gemm -> [1,2]

    Guards defect 2: with an image folder as calibration data onnx-linf resizes every image to the
    declared size (480 GB of float32 per image) and dies in MemoryError. It must refuse before
    allocating anything, from the declared shapes and a documented byte limit.
    """
    g = GraphBuilder(32)
    x = g.node("Relu", [g.conv("input", 3, 4, "conv")], "relu")
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x], "gap")], "flatten", axis=1)
    out = g.gemm(x, 4, 2, "fc")
    # full_check would run shape inference on 1.2e11-element maps: it is fine (symbolic), but keep
    # the plain check to stay fast.
    return _finish(g, [1, 3, 200000, 200000], out, [1, 2], opset=17, ir=8)


def nan_weights() -> onnx.ModelProto:
    """plain_cnn with NaN in conv2's weights for 2 of its 5 output channels::

        input[N,3,8,8] -> conv1 -> bn1 -> relu1 -> conv2 (W[1], W[3] contain NaN) -> relu2 -> Flatten -> Gemm

    Guards defect 3: the channels 1 and 3 of relu2_out have NaN statistics and every logit is NaN;
    scan must say so loudly (report field + stderr warning / non-zero exit), not rank the finite channels.
    """
    model = plain_cnn()
    for i, init in enumerate(model.graph.initializer):
        if init.name == "conv2.w":
            w = numpy_helper.to_array(init).copy()
            w[1, 0, 0, 0] = np.nan
            w[3, 2, 1, 1] = np.nan
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.checker.check_model(model, full_check=True)
    return model


def ir14(opset: int = 21) -> onnx.ModelProto:
    """plain_cnn saved with IR version 14 (what onnx >= 1.19's make_model writes by default)::

        input[N,3,8,8] -> conv1 -> bn1 -> relu1 -> conv2 -> relu2 -> Flatten -> Gemm; ir_version = 14

    Guards defect 4: the installed ONNX Runtime (1.31.1: max IR 13) refuses it with a 300-character
    "Unsupported model IR version: 14, max supported IR version: 13" internal message. Opset 21
    only needs IR 10, so onnx-linf can run an in-memory copy with IR 10 and keep 14 in its output,
    or fail in one line.
    """
    model = plain_cnn(opset=opset)
    model.ir_version = 14
    onnx.checker.check_model(model, full_check=True)
    return model


def opset7() -> onnx.ModelProto:
    """plain_cnn at opset 7 (IR 3 style without initializer inputs is not allowed, so IR 4)::

        input[N,3,8,8] -> conv1 -> bn1 (opset-7 BN, spatial=1) -> relu1 -> conv2 -> relu2 -> Flatten -> Gemm

    Guards defect 5: clamp says "needs opset >= 8"; onnx.version_converter lifts 7 -> 8 (and further)
    without touching these ops, so clamp can convert an in-memory copy (or refuse, documented).
    """
    return plain_cnn(opset=7)


def tf_style_nhwc(pool_first: bool = False) -> onnx.ModelProto:
    """The layouts tf2onnx writes for a Keras CNN with NHWC input (opset 13)::

        input[N,8,8,3] -> Transpose(0,3,1,2) -> conv1 -> Relu -> conv2 -> Relu [N,16,8,8]   (NCHW stack)
        pool_first=False (Keras GAP after the transpose back, tf2onnx without optimizer):
          -> Transpose(0,2,3,1) [N,8,8,16] -> ReduceMean(axes=[1,2], keepdims=1) [N,1,1,16]
        pool_first=True (tf2onnx's transpose optimizer pushes the Transpose past the mean):
          -> ReduceMean(axes=[2,3], keepdims=1) [N,16,1,1] -> Transpose(0,2,3,1) [N,1,1,16]
        -> Reshape([-1,16]) [N,16] -> Gemm(16->5) -> [N,5]

    Today's `_find_head_map` picks the 4-D input of the latest head op and looks through pooling:
    pool_first=False -> `to_nhwc_out`, an NHWC tensor read as 8 "channels" (= rows) of 8x16;
    pool_first=True  -> `to_nhwc_out`, the pooled vector read as 1 "channel" of 1x16 (the issue's
    ResNet-50 case). Guards defect 6: the last map must be relu2_out (16 channels, 8x8) in both; a
    pooled or transposed tensor is never a map; prune must not zero the whole feature vector and
    call it verified (gate on calibration top-1 agreement).
    """
    g = GraphBuilder(36)
    t = g.node("Transpose", ["input"], "to_nchw", perm=[0, 3, 1, 2])
    x = g.node("Relu", [g.conv(t, 3, 8, "conv1")], "relu1")
    x = g.node("Relu", [g.conv(x, 8, 16, "conv2")], "relu2")
    if pool_first:
        x = g.node("ReduceMean", [x], "gap", axes=[2, 3], keepdims=1)
        x = g.node("Transpose", [x], "to_nhwc", perm=[0, 2, 3, 1])
    else:
        x = g.node("Transpose", [x], "to_nhwc", perm=[0, 2, 3, 1])
        x = g.node("ReduceMean", [x], "gap", axes=[1, 2], keepdims=1)
    shape = "reshape.shape"
    g.inits.append(numpy_helper.from_array(np.array([-1, 16], np.int64), shape))
    x = g.node("Reshape", [x, shape], "flatten")
    # Rows summing to zero ignore the features' common level, so predictions follow the image
    # (a random head on random features would predict one class for every input).
    w = g.rng.normal(0, 1.0, (5, 16))
    w -= w.mean(axis=1, keepdims=True)
    out = g.node("Gemm", [x, g.const("fc.w", w), g.const("fc.b", np.zeros(5))], "fc", transB=1)
    return _finish(g, ["N", 8, 8, 3], out, ["N", 5], opset=13, ir=8)


def deep_random_resnet(blocks: int = 4, width: int = 16, size: int = 16, gain: float = 1.6,
                       seed: int = 37) -> onnx.ModelProto:
    """A ResNet-ish stack with random (untrained) He-scaled weights and large logits (|logit| ~ 100s)::

        input[N,3,S,S] -> stem conv -> BN -> Relu
          -> blocks x [conv -> BN -> Relu -> conv -> BN] + skip -> Add -> Relu   (2*blocks+1 = 9 convs)
          -> GAP -> Flatten -> Gemm(width -> 10) -> logits

    Guards defect 7: with random weights the logits are large, and the rewritten model's outputs
    differ from the original's by float rounding only (ORT fuses Conv+Add+Relu differently when a
    Min is inserted after the Add, and the accumulation order changes). A fixed atol 1e-5 +
    rtol 1e-5 * |ref| rejects that; verification must tell rounding from real surgery errors.
    """
    rng = np.random.default_rng(seed)
    g = GraphBuilder(seed)

    def conv(x, cin, cout, name, k=3):
        w = rng.normal(0, gain * np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k))
        wn = g.const(f"{name}.w", w)
        return g.node("Conv", [x, wn], name, pads=[k // 2] * 4, kernel_shape=[k, k])

    def bn(x, c, name):
        s = g.const(f"{name}.scale", rng.uniform(0.8, 1.2, c))
        b = g.const(f"{name}.bias", rng.normal(0, 0.1, c))
        m = g.const(f"{name}.mean", rng.normal(0, 0.05, c))
        v = g.const(f"{name}.var", rng.uniform(0.9, 1.1, c))
        return g.node("BatchNormalization", [x, s, b, m, v], name, epsilon=1e-5)

    x = g.node("Relu", [bn(conv("input", 3, width, "stem"), width, "stem_bn")], "stem_relu")
    for i in range(blocks):
        y = g.node("Relu", [bn(conv(x, width, width, f"b{i}c1"), width, f"b{i}bn1")], f"b{i}r1")
        y = bn(conv(y, width, width, f"b{i}c2"), width, f"b{i}bn2")
        x = g.node("Relu", [g.node("Add", [y, x], f"b{i}add")], f"b{i}relu")
    f = g.node("Flatten", [g.node("GlobalAveragePool", [x], "gap")], "flatten", axis=1)
    w = g.const("fc.w", rng.normal(0, 1.0, (10, width)))
    b = g.const("fc.b", rng.normal(0, 0.1, 10))
    out = g.node("Gemm", [f, w, b], "fc", transB=1)
    return _finish(g, ["N", 3, size, size], out, ["N", 10], opset=17, ir=8)


def computed_head_weight() -> onnx.ModelProto:
    """The model-zoo Inception v1 head: the classifier weight is a 4-D tensor computed by nodes::

        input -> conv1 -> Relu -> conv2 -> Relu -> AveragePool(8x8) [N,5,1,1] -> Reshape -> [N,5] --+
        ConstantOfShape([3,5,1,1]) -> Reshape([3,5]) ----------------------------------------------- Gemm(transB)

    The weight's Reshape is the latest head op with a 4-D input, so today's `_find_head_map` makes
    the *weight* the last map (prune then "zeroes channels" of the classifier weight). Guards: the
    last map must depend on the graph input (relu2_out here).
    """
    g = GraphBuilder(38)
    x = g.node("Relu", [g.conv("input", 3, 4, "conv1")], "relu1")
    x = g.node("Relu", [g.conv(x, 4, 5, "conv2")], "relu2")
    x = g.node("AveragePool", [x], "pool", kernel_shape=[8, 8])
    g.inits.append(numpy_helper.from_array(np.array([-1, 5], np.int64), "flat.shape"))
    x = g.node("Reshape", [x, "flat.shape"], "flatten")
    g.inits.append(numpy_helper.from_array(np.array([3, 5, 1, 1], np.int64), "w.shape4"))
    g.nodes.append(helper.make_node("ConstantOfShape", ["w.shape4"], ["w4"], name="make_w",
                                    value=numpy_helper.from_array(np.array([0.02], np.float32))))
    g.inits.append(numpy_helper.from_array(np.array([3, 5], np.int64), "w.shape2"))
    w = g.node("Reshape", ["w4", "w.shape2"], "w_reshape")
    out = g.node("Gemm", [x, w, g.const("fc.b", g.rng.normal(0, 0.1, 3))], "fc", transB=1)
    return _finish(g, ["N", 3, 8, 8], out, ["N", 3], opset=13, ir=8)


ALL = {
    "computed_head_weight": computed_head_weight,
    "ir3_with_initializer_inputs_batch1": ir3_with_initializer_inputs_batch1,
    "huge_declared_input": huge_declared_input,
    "nan_weights": nan_weights,
    "ir14": ir14,
    "opset7": opset7,
    "tf_style_nhwc": tf_style_nhwc,
    "tf_style_nhwc_pool_first": lambda: tf_style_nhwc(pool_first=True),
    "deep_random_resnet": deep_random_resnet,
}


def tf_style_nhwc_cast() -> onnx.ModelProto:
    """A cast-heavy TF export: the map goes through Cast -> Transpose -> Cast before the pooled head::

        input[N,8,8,3] -> Transpose -> conv1 -> Relu -> conv2 -> Relu [N,16,8,8] -> Cast(float)
          -> Transpose(0,2,3,1) -> Cast(float) -> ReduceMean(1,2) -> Reshape -> Gemm -> [N,5]

    Guards the "no last map at all" case of issue 12 (309 Casts between map and head): the walk back
    from the head goes through Casts as well as layout ops.
    """
    model = tf_style_nhwc(pool_first=False)
    nodes = list(model.graph.node)
    k = next(i for i, n in enumerate(nodes) if n.op_type == "Transpose" and n.input[0] == "relu2_out")
    transpose = nodes[k]
    before = helper.make_node("Cast", ["relu2_out"], ["cast_a_out"], name="cast_a", to=TensorProto.FLOAT)
    after = helper.make_node("Cast", ["to_nhwc_raw"], [transpose.output[0]], name="cast_b", to=TensorProto.FLOAT)
    transpose.input[0] = "cast_a_out"
    transpose.output[0] = "to_nhwc_raw"
    del model.graph.node[:]
    model.graph.node.extend(nodes[:k] + [before, transpose, after] + nodes[k + 1:])
    onnx.checker.check_model(model, full_check=True)
    return model


def with_unused_initializer(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model plus an initializer no node reads: ONNX Runtime warns about it on stderr when it
    loads the model at its default log severity (guards: its warnings never reach our output)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "unused_weight"))
    return out

