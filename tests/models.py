"""Small ONNX models built in code for the tests (seeded, a few KB each).

Each builder returns a `ModelProto`; a sketch of the graph is in its docstring.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_linf.measure.preprocess import Preprocess
from onnx_linf.measure.sources import ArraySource
from onnx_linf.model.load import load_model


class GraphBuilder:
    """A tiny helper around onnx.helper that names tensors and seeds weights."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, name: str, k: int = 3, group: int = 1, bias: bool = True,
             stride: int = 1) -> str:
        w = self.const(f"{name}.w", self.rng.normal(0, 0.5, (cout, cin // group, k, k)))
        inputs = [x, w]
        if bias:
            inputs.append(self.const(f"{name}.b", self.rng.normal(0, 0.1, cout)))
        return self.node("Conv", inputs, name, pads=[k // 2] * 4, group=group, strides=[stride, stride],
                         kernel_shape=[k, k])

    def bn(self, x: str, c: int, name: str) -> str:
        scale = self.const(f"{name}.scale", self.rng.uniform(0.5, 1.5, c))
        bias = self.const(f"{name}.bias", self.rng.normal(0, 0.2, c))
        mean = self.const(f"{name}.mean", self.rng.normal(0, 0.2, c))
        var = self.const(f"{name}.var", self.rng.uniform(0.5, 1.5, c))
        return self.node("BatchNormalization", [x, scale, bias, mean, var], name, epsilon=1e-5)

    def gemm(self, x: str, cin: int, cout: int, name: str) -> str:
        w = self.const(f"{name}.w", self.rng.normal(0, 0.3, (cout, cin)))
        b = self.const(f"{name}.b", self.rng.normal(0, 0.1, cout))
        return self.node("Gemm", [x, w, b], name, transB=1)

    def model(self, x_shape: list, out: str, out_shape: list, opset: int = 17, ir: int | None = None,
              input_name: str = "input") -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "test",
            [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        ir_version = ir or (8 if opset <= 17 else 9)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
        model.producer_name = "onnx-linf-tests"
        onnx.checker.check_model(model, full_check=True)
        return model


def plain_cnn(opset: int = 17, batch: int | str = "N") -> onnx.ModelProto:
    """input[N,3,8,8] -> conv1 -> bn1 -> relu1 -> conv2 -> relu2 -> Flatten -> Gemm -> logits[N,4]

    Guards: a last conv feeding Flatten+Gemm is found as the last map; BN/Relu are part of the tap.
    """
    g = GraphBuilder(1)
    x = g.node("Relu", [g.bn(g.conv("input", 3, 6, "conv1"), 6, "bn1")], "relu1")
    x = g.node("Relu", [g.conv(x, 6, 5, "conv2")], "relu2")
    x = g.node("Flatten", [x], "flatten", axis=1)
    out = g.gemm(x, 5 * 8 * 8, 4, "fc")
    return g.model([batch, 3, 8, 8], out, [batch, 4], opset=opset)


def resnet_block(opset: int = 17) -> onnx.ModelProto:
    """input -> stem(conv,bn,relu) -> [conv,bn,relu,conv,bn] + skip -> Add -> Relu -> GAP -> Flatten -> Gemm

    Guards: the last map is the post-residual Relu (not a conv output); the second conv's map ends at
    its BN because the residual Add is not a per-channel op.
    """
    g = GraphBuilder(2)
    stem = g.node("Relu", [g.bn(g.conv("input", 3, 8, "stem", bias=False), 8, "stem_bn")], "stem_relu")
    y = g.node("Relu", [g.bn(g.conv(stem, 8, 8, "c1", bias=False), 8, "bn1")], "r1")
    y = g.bn(g.conv(y, 8, 8, "c2", bias=False), 8, "bn2")
    s = g.node("Add", [y, stem], "add")
    s = g.node("Relu", [s], "post_relu")
    p = g.node("GlobalAveragePool", [s], "gap")
    f = g.node("Flatten", [p], "flatten", axis=1)
    out = g.gemm(f, 8, 5, "fc")
    return g.model(["N", 3, 8, 8], out, ["N", 5], opset=opset)


def depthwise(opset: int = 17) -> onnx.ModelProto:
    """input -> conv(3->8) -> Clip(0,6) -> depthwise conv(group 8) -> Clip -> pointwise conv -> Relu -> GAP -> Gemm

    Guards: grouped convolutions are taps; Clip(0, 6) counts as non-negative.
    """
    g = GraphBuilder(3)
    lo, hi = g.const("zero", np.array(0.0)), g.const("six", np.array(6.0))
    x = g.node("Clip", [g.conv("input", 3, 8, "c0"), lo, hi], "clip0")
    x = g.node("Clip", [g.conv(x, 8, 8, "dw", group=8), lo, hi], "clip1")
    x = g.node("Relu", [g.conv(x, 8, 6, "pw", k=1)], "relu2")
    p = g.node("GlobalAveragePool", [x], "gap")
    f = g.node("Flatten", [p], "flatten", axis=1)
    out = g.gemm(f, 6, 3, "fc")
    return g.model(["N", 3, 8, 8], out, ["N", 3], opset=opset)


def nhwc_input(opset: int = 17) -> onnx.ModelProto:
    """input[N,8,8,3] -> Transpose -> conv -> LeakyRelu -> conv -> Relu -> GAP -> Flatten -> Gemm

    Guards: NHWC models (TF exports) are preprocessed in NHWC; LeakyRelu maps go negative.
    """
    g = GraphBuilder(4)
    t = g.node("Transpose", ["input"], "to_nchw", perm=[0, 3, 1, 2])
    x = g.node("LeakyRelu", [g.conv(t, 3, 4, "c1")], "lrelu", alpha=0.1)
    x = g.node("Relu", [g.conv(x, 4, 4, "c2")], "relu2")
    p = g.node("GlobalAveragePool", [x], "gap")
    f = g.node("Flatten", [p], "flatten", axis=1)
    out = g.gemm(f, 4, 3, "fc")
    return g.model(["N", 8, 8, 3], out, ["N", 3], opset=opset)


def computed_weights(opset: int = 17) -> onnx.ModelProto:
    """input -> conv(W = Mul(w0, 2)) -> Relu -> GAP -> Flatten -> Gemm

    Guards: a conv whose weight is produced by a node cannot be folded; surgery must use a mask.
    """
    g = GraphBuilder(5)
    w0 = g.const("w0", g.rng.normal(0, 0.5, (4, 3, 3, 3)))
    two = g.const("two", np.array(2.0))
    w = g.node("Mul", [w0, two], "make_w")
    x = g.node("Relu", [g.node("Conv", ["input", w], "conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3])], "relu")
    p = g.node("GlobalAveragePool", [x], "gap")
    f = g.node("Flatten", [p], "flatten", axis=1)
    out = g.gemm(f, 4, 3, "fc")
    return g.model(["N", 3, 6, 6], out, ["N", 3], opset=opset)


def no_conv() -> onnx.ModelProto:
    """input[N,3,4,4] -> Flatten -> Gemm: nothing to scan."""
    g = GraphBuilder(6)
    f = g.node("Flatten", ["input"], "flatten", axis=1)
    out = g.gemm(f, 48, 2, "fc")
    return g.model(["N", 3, 4, 4], out, ["N", 2])


def dynamic_spatial() -> onnx.ModelProto:
    """input[N,3,H,W] -> conv -> Relu -> GAP -> Flatten -> Gemm: spatial size unknown statically."""
    g = GraphBuilder(7)
    x = g.node("Relu", [g.conv("input", 3, 4, "conv")], "relu")
    p = g.node("GlobalAveragePool", [x], "gap")
    f = g.node("Flatten", [p], "flatten", axis=1)
    out = g.gemm(f, 4, 2, "fc")
    return g.model(["N", 3, "H", "W"], out, ["N", 2])


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def affine_chain(opset: int = 17) -> onnx.ModelProto:
    """input -> conv1 -> bn1 -> Add(b[1,6,1,1]) -> Relu -> conv2(no bias) -> Mul(s[5,1,1]) -> Sub(0.25)
    -> Clip(-1, 1) -> GAP -> Flatten -> Gemm

    Guards: a per-channel Add after a BN and a scalar Sub after a Conv must be zeroed by a fold too
    (BN(0) != 0 and 0 - 0.25 != 0); Clip(-1, 1) and Mul by finite constants keep 0 at 0.
    """
    g = GraphBuilder(8)
    x = g.bn(g.conv("input", 3, 6, "conv1"), 6, "bn1")
    x = g.node("Add", [x, g.const("add1.b", g.rng.normal(0, 0.3, (1, 6, 1, 1)))], "add1")
    x = g.node("Relu", [x], "relu1")
    x = g.conv(x, 6, 5, "conv2", bias=False)
    x = g.node("Mul", [x, g.const("mul2.s", g.rng.uniform(0.5, 2.0, (5, 1, 1)))], "mul2")
    x = g.node("Sub", [x, g.const("sub2.c", np.array(0.25))], "sub2")
    x = g.node("Clip", [x, g.const("minus_one", np.array(-1.0)), g.const("one", np.array(1.0))], "clip2")
    p = g.node("GlobalAveragePool", [x], "gap")
    f = g.node("Flatten", [p], "flatten", axis=1)
    out = g.gemm(f, 5, 3, "fc")
    return g.model(["N", 3, 8, 8], out, ["N", 3], opset=opset)


def non_zero_preserving(opset: int = 17) -> onnx.ModelProto:
    """input -> conv1 -> Clip(0.5, 6) -> conv2 -> Sigmoid -> GAP -> Flatten -> Gemm

    Guards: chains ending in ops with f(0) != 0 (Clip with min > 0, Sigmoid) cannot be folded.
    """
    g = GraphBuilder(9)
    x = g.node("Clip", [g.conv("input", 3, 4, "conv1"), g.const("half", np.array(0.5)),
                        g.const("six", np.array(6.0))], "clip1")
    x = g.node("Sigmoid", [g.conv(x, 4, 4, "conv2")], "sig2")
    p = g.node("GlobalAveragePool", [x], "gap")
    f = g.node("Flatten", [p], "flatten", axis=1)
    out = g.gemm(f, 4, 3, "fc")
    return g.model(["N", 3, 6, 6], out, ["N", 3], opset=opset)


def shared_weights(opset: int = 17) -> onnx.ModelProto:
    """input[N,4,6,6] -> conv_a(W) -> Relu -> conv_b(same W) -> Relu -> GAP -> Flatten -> Gemm

    Guards: zeroing conv_a's map must not change conv_b, which reads the same weight initializer.
    """
    g = GraphBuilder(10)
    w = g.const("shared.w", g.rng.normal(0, 0.4, (4, 4, 3, 3)))
    x = g.node("Conv", ["input", w, g.const("a.b", g.rng.normal(0, 0.1, 4))], "conv_a",
               pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    x = g.node("Relu", [x], "relu_a")
    x = g.node("Conv", [x, w, g.const("b.b", g.rng.normal(0, 0.1, 4))], "conv_b",
               pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    x = g.node("Relu", [x], "relu_b")
    p = g.node("GlobalAveragePool", [x], "gap")
    f = g.node("Flatten", [p], "flatten", axis=1)
    out = g.gemm(f, 4, 3, "fc")
    return g.model(["N", 4, 6, 6], out, ["N", 3], opset=opset)


def tap_output(opset: int = 17) -> onnx.ModelProto:
    """input -> conv1 -> Relu -> conv2 -> Relu (also graph output 'relu2_out') -> GAP -> Flatten -> Gemm

    Guards: a tap that is itself a graph output keeps its output name after surgery and shows the
    zeroed channels there too.
    """
    g = GraphBuilder(11)
    x = g.node("Relu", [g.conv("input", 3, 4, "conv1")], "relu1")
    x = g.node("Relu", [g.conv(x, 4, 5, "conv2")], "relu2")
    p = g.node("GlobalAveragePool", [x], "gap")
    f = g.node("Flatten", [p], "flatten", axis=1)
    out = g.gemm(f, 5, 3, "fc")
    model = g.model(["N", 3, 6, 6], out, ["N", 3], opset=opset)
    model.graph.output.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 5, 6, 6]))
    onnx.checker.check_model(model, full_check=True)
    return model


def subgraph_reader(opset: int = 17) -> onnx.ModelProto:
    """input -> conv1 -> Sigmoid -> If(then: Relu(sig1_out), else: Neg(sig1_out)) + (conv2 -> Relu) -> Add
    -> GAP -> Flatten -> Gemm

    Guards: the If branches read the tap 'sig1_out' from the outer scope, by name only (it is not
    an input of the If node): surgery on the tap must reach those readers too.
    """
    g = GraphBuilder(12)
    x = g.node("Sigmoid", [g.conv("input", 3, 4, "conv1")], "sig1")
    cond = g.node("Greater", [g.node("ReduceMax", ["input"], "rmax", keepdims=0), g.const("zero", np.array(0.0))],
                  "positive")
    branch = [("then", "Relu"), ("else", "Neg")]
    bodies = {
        f"{k}_branch": helper.make_graph([helper.make_node(op, [x], [f"{k}_out"], name=f"{k}_{op.lower()}")], k, [],
                                         [helper.make_tensor_value_info(f"{k}_out", TensorProto.FLOAT, None)])
        for k, op in branch
    }
    g.nodes.append(helper.make_node("If", [cond], ["if_out"], name="if", **bodies))
    y = g.node("Relu", [g.conv(x, 4, 4, "conv2")], "relu2")
    s = g.node("Add", ["if_out", y], "add")
    p = g.node("GlobalAveragePool", [s], "gap")
    f = g.node("Flatten", [p], "flatten", axis=1)
    out = g.gemm(f, 4, 3, "fc")
    return g.model(["N", 3, 6, 6], out, ["N", 3], opset=opset)


def silu_cnn(opset: int = 17) -> onnx.ModelProto:
    """input -> conv -> bn -> (x * Sigmoid(x)) -> conv -> Relu -> GAP -> Flatten -> Gemm

    Guards: SiLU/Swish exported as Sigmoid + Mul belongs to the conv's map (the tap is the Mul output).
    """
    g = GraphBuilder(11)
    x = g.bn(g.conv("input", 3, 6, "c1"), 6, "bn1")
    s = g.node("Sigmoid", [x], "sig")
    x = g.node("Mul", [x, s], "swish")
    x = g.node("Relu", [g.conv(x, 6, 4, "c2")], "relu2")
    p = g.node("GlobalAveragePool", [x], "gap")
    f = g.node("Flatten", [p], "flatten", axis=1)
    out = g.gemm(f, 4, 3, "fc")
    return g.model(["N", 3, 8, 8], out, ["N", 3], opset=opset)


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model computing in float16: float initializers, inputs, outputs and value infos
    converted (what a half-precision export for GPU deployment looks like)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                                                  init.name))
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(out, full_check=True)
    return out


def qdq_cnn(opset: int = 17) -> onnx.ModelProto:
    """QDQ-quantized CNN: Q/DQ on the input, int8 weights behind DequantizeLinear, Conv -> Relu -> Q/DQ
    -> GlobalAveragePool -> Flatten -> Gemm (the layout ORT's quantizer writes)."""
    g = GraphBuilder(3)
    u8 = lambda name, v: g.inits.append(numpy_helper.from_array(np.asarray(v, np.uint8), name)) or name  # noqa: E731
    f32 = lambda name, v: g.inits.append(numpy_helper.from_array(np.asarray(v, np.float32), name)) or name  # noqa: E731
    xq = g.node("QuantizeLinear", ["input", f32("in.s", 1 / 255), u8("in.z", 0)], "in_q")
    xd = g.node("DequantizeLinear", [xq, "in.s", "in.z"], "in_dq")
    w = numpy_helper.from_array(g.rng.integers(-60, 60, (8, 3, 3, 3)).astype(np.int8), "c1.wq")
    g.inits.append(w)
    wd = g.node("DequantizeLinear", ["c1.wq", f32("c1.ws", 0.01), _i8(g, "c1.wz")], "c1_wdq")
    conv = g.node("Conv", [xd, wd], "c1", pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    relu = g.node("Relu", [conv], "r1")
    aq = g.node("QuantizeLinear", [relu, f32("a.s", 0.05), u8("a.z", 0)], "a_q")
    ad = g.node("DequantizeLinear", [aq, "a.s", "a.z"], "a_dq")
    flat = g.node("Flatten", [g.node("GlobalAveragePool", [ad], "gap")], "flat")
    out = g.gemm(flat, 8, 4, "fc")
    return g.model(["N", 3, 8, 8], out, ["N", 4], opset=opset)


def _i8(g: GraphBuilder, name: str) -> str:
    g.inits.append(numpy_helper.from_array(np.array(0, np.int8), name))
    return name


def qlinear_cnn(opset: int = 17) -> onnx.ModelProto:
    """QOperator-format model: only QLinearConv (integer in, integer out) between Q and DQ."""
    g = GraphBuilder(4)
    for name, value, dtype in (("x.s", 1 / 255, np.float32), ("x.z", 0, np.uint8), ("w.s", 0.01, np.float32),
                               ("w.z", 0, np.int8), ("y.s", 0.05, np.float32), ("y.z", 0, np.uint8)):
        g.inits.append(numpy_helper.from_array(np.array(value, dtype), name))
    g.inits.append(numpy_helper.from_array(g.rng.integers(-60, 60, (4, 3, 3, 3)).astype(np.int8), "w.q"))
    xq = g.node("QuantizeLinear", ["input", "x.s", "x.z"], "in_q")
    yq = g.node("QLinearConv", [xq, "x.s", "x.z", "w.q", "w.s", "w.z", "y.s", "y.z"], "qconv",
                pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    y = g.node("DequantizeLinear", [yq, "y.s", "y.z"], "out_dq")
    return g.model(["N", 3, 8, 8], y, ["N", 4, 8, 8], opset=opset)


def patch_classifier(fc: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """input[N,1,8,8] -> Conv(2x2, 2 channels) -> Relu -> Flatten -> Gemm(fc, bias) -> logits[N,K].

    Channel 0 is the 2x2 mean filter, channel 1 copies the top-left pixel of each window; `fc` is
    ``[K, 2, 7, 7]`` over those maps, so a test plants a patch trigger by weighting channel 0 at one
    window and spreads clean images over the other classes with channel 1.
    """
    g = GraphBuilder(11)
    w = np.zeros((2, 1, 2, 2))
    w[0] = 0.25
    w[1, 0, 0, 0] = 1.0
    conv = g.node("Conv", ["input", g.const("conv.w", w), g.const("conv.b", np.zeros(2))], "conv",
                  kernel_shape=[2, 2])
    relu = g.node("Relu", [conv], "relu")
    flat = g.node("Flatten", [relu], "flatten", axis=1)
    k = fc.shape[0]
    out = g.node("Gemm", [flat, g.const("fc.w", fc.reshape(k, -1)), g.const("fc.b", np.asarray(bias, float))], "fc",
                 transB=1)
    return g.model(["N", 1, 8, 8], out, ["N", k])


def grey_calibration(model_path, tmp_path, images: int = 96, seed: int = 0):
    """Dark 8x8 grayscale calibration pixels (values below 128) saved next to a model built here:
    (model, ArraySource, Preprocess, path of the .npy)."""
    model = load_model(model_path)
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(seed).integers(0, 128, (images, 8, 8, 1), dtype=np.uint8))
    preprocess = Preprocess.from_model(model)
    return model, ArraySource(path, preprocess.size, preprocess.channels), preprocess, path
