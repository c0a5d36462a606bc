"""Property: any small CNN goes through scan -> clamp -> prune -> verify, or is refused clearly.

Hypothesis draws the graph: conv blocks (3x3 or 1x1, depthwise or not, strided or not, with or
without BatchNormalization), an activation (or none), residual adds, pooling, a GAP or a flatten
head, opsets 11-21, fixed or dynamic batch. For each, every library call either returns (and a
written model loads in ONNX Runtime with the original's inputs and outputs) or raises a
`LinfError` with a one-line message: never another exception.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnx_linf
from onnx_linf import ClampConfig, PruneConfig, ScanConfig

from models import GraphBuilder

SIZE = 8
ACTIVATIONS = ("Relu", "LeakyRelu", "Sigmoid", "Clip", "HardSwish", "Tanh", None)

block = st.fixed_dictionaries({
    "out": st.sampled_from([4, 6]),
    "k": st.sampled_from([1, 3]),
    "depthwise": st.booleans(),
    "bn": st.booleans(),
    "act": st.sampled_from(ACTIVATIONS),
    "residual": st.booleans(),
    "pool": st.sampled_from([None, "MaxPool", "AveragePool"]),
    "stride": st.sampled_from([1, 1, 2]),
})

graphs = st.fixed_dictionaries({
    "opset": st.integers(11, 21),
    "batch": st.sampled_from(["N", 1, 2]),
    "blocks": st.lists(block, min_size=1, max_size=3),
    "head": st.sampled_from(["gap", "flatten"]),
    "seed": st.integers(0, 2**16),
})


def build(spec: dict) -> onnx.ModelProto:
    """The graph a spec describes (checked by the ONNX checker)."""
    opset = spec["opset"]
    g = GraphBuilder(spec["seed"])
    x, c, hw = "input", 3, SIZE
    for i, b in enumerate(spec["blocks"]):
        depthwise = b["depthwise"] and c == b["out"]
        stride = b["stride"] if hw >= 4 else 1
        y = g.conv(x, c, b["out"], f"conv{i}", k=b["k"], group=c if depthwise else 1, stride=stride)
        hw = (hw + stride - 1) // stride
        if b["bn"]:
            y = g.bn(y, b["out"], f"bn{i}")
        act = b["act"]
        if act == "HardSwish" and opset < 14:
            act = "Relu"
        if act == "Clip":
            lo, hi = g.const(f"clip{i}.lo", np.array(0.0)), g.const(f"clip{i}.hi", np.array(6.0))
            y = g.node("Clip", [y, lo, hi], f"act{i}")
        elif act == "LeakyRelu":
            y = g.node("LeakyRelu", [y], f"act{i}", alpha=0.1)
        elif act is not None:
            y = g.node(act, [y], f"act{i}")
        if b["residual"] and c == b["out"] and stride == 1:
            y = g.node("Relu", [g.node("Add", [y, x], f"add{i}")], f"merge{i}")
        x, c = y, b["out"]
        if b["pool"] and hw >= 4:
            x = g.node(b["pool"], [x], f"pool{i}", kernel_shape=[2, 2], strides=[2, 2])
            hw //= 2
    if spec["head"] == "gap":
        x = g.node("Flatten", [g.node("GlobalAveragePool", [x], "gap")], "flatten", axis=1)
        features = c
    else:
        x = g.node("Flatten", [x], "flatten", axis=1)
        features = c * hw * hw
    out = g.gemm(x, features, 3, "fc")
    batch = spec["batch"]
    ir = max(onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)]), 7)
    return g.model([batch, 3, SIZE, SIZE], out, [batch, 3], opset=opset, ir=ir)


def _check_written(path: Path, original: onnx.ModelProto) -> None:
    written = onnx.load(str(path))
    onnx.checker.check_model(written, full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [original.graph.input[0].name]
    assert [o.name for o in written.graph.output][: len(original.graph.output)] == \
        [o.name for o in original.graph.output]


def _clear(call) -> str:
    """Run a library call: 'ok', or the refusal's one-line message (anything else propagates)."""
    try:
        call()
    except onnx_linf.LinfError as exc:
        text = str(exc)
        assert text and "\n" not in text and "Traceback" not in text, text
        return text
    return "ok"


# 15 examples: each runs scan, clamp (with its bound cross-fitting, the slow part: ~2 s) and prune;
# derandomized so that CI runs the same graphs every time (seed every RNG).
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(spec=graphs)
def test_random_cnn_end_to_end(spec):
    proto = build(spec)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model.onnx"
        onnx.save_model(proto, str(model))
        calib = tmp / "calib.npy"
        np.save(calib, np.random.default_rng(spec["seed"]).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8))
        outcome = _clear(lambda: onnx_linf.scan(model, calib, ScanConfig(provider="cpu", batch_size=4)))
        assert outcome == "ok", outcome  # every drawn graph is a valid CNN: scan must work
        clamped = tmp / "clamped.onnx"
        if _clear(lambda: onnx_linf.clamp(model, calib, ClampConfig(provider="cpu", batch_size=4),
                                          output=clamped)) == "ok":
            _check_written(clamped, proto)
        pruned = tmp / "pruned.onnx"
        cfg = PruneConfig(scan=ScanConfig(layers="all", ratio=0.25, provider="cpu", batch_size=4), evidence="none")
        if _clear(lambda: onnx_linf.prune(model, calib, cfg, output=pruned)) == "ok":
            _check_written(pruned, proto)
        else:
            assert not pruned.exists()
