"""A CPU deployment artefact: the bounds computed in ONNX Runtime's blocked (NCHWc) layout.

On the CPU, ONNX Runtime rewrites convolutions and pools into a blocked layout (channels in groups
of ``B`` innermost: memory order ``[N][C/B][H][W][B]``, B = 8 with AVX2, 16 with AVX-512) and keeps
no elementwise op with a constant operand in it: every bounded map is reordered to NCHW, bounded
and reordered back, two extra passes over the map. The bounds themselves are elementwise, so they
give the same values on the blocked buffer once their constants are laid out in the same order:

* ``Min``/``Max``/``Add``/``Sub``/``Mul``/``Div`` with a constant ``[C,H,W]`` or ``[C,1,1]``
  operand: the constant is permuted (a ``[C,1,1]`` one expanded first) into blocked order;
* the same ops with a per-image, per-channel operand ``[N,C,1,1]`` (the channel-mean factor), which
  is in blocked order already (one position): ORT's blocked ``Upsample`` spreads it over the map;
* elementwise ops between two blocked maps of the same shape, unary elementwise ops: as they are;
* ``GlobalAveragePool`` of a blocked map: ORT's blocked pool (its ``[N,C,1,1]`` output is in NCHW order);
* ``ReduceMax``/``ReduceMin`` over axes 1, 2 and 3 (the score output's position part): the same
  elements per image in another order, so the same value.

`blocked_artifact` asks ONNX Runtime for its optimised graph (``optimized_model_filepath``), finds
the reorders that only feed such ops, runs those ops on the blocked tensors instead and lets the
next blocked op read the result directly. What it writes is ORT-specific and CPU-specific, as ORT's
own optimised models are (weights already in the blocked layout of *this* CPU, ``com.microsoft.nchwc``
operators of stock ONNX Runtime): an optional artefact next to the portable model, with its block
size in the metadata (`BLOCK_KEY`), checked by the caller against the portable model.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ..errors import RewriteError

log = logging.getLogger(__name__)

#: Metadata key holding the block size the artefact was written for.
BLOCK_KEY = "onnx_linf_nchwc_block"
_NCHWC = "com.microsoft.nchwc"
_BINARY = {"Add", "Sub", "Mul", "Div", "Min", "Max"}
_UNARY = {"Relu", "Neg", "Abs", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Identity", "Clip"}
#: Reductions that give the same value on a blocked map when they reduce every non-batch axis.
_WHOLE_REDUCE = {"ReduceMax", "ReduceMin"}


@dataclass(frozen=True)
class BlockedResult:
    """What `blocked_artifact` did."""

    proto: onnx.ModelProto
    """The artefact: ORT's optimised graph with the bounds moved into the blocked layout."""
    block: int
    """The NCHWc block size of this CPU (the artefact is only valid where ORT uses the same)."""
    reorders_before: int
    """``ReorderInput``/``ReorderOutput`` nodes in ORT's own optimised graph."""
    reorders_after: int
    """The same count in the artefact."""
    blocked_ops: int
    """Elementwise nodes that now run on blocked tensors."""


def _session(payload: bytes, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])


def _optimized(payload: bytes) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="onnx-linf-ort-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        _session(payload, path)
        return onnx.load(str(path))


@functools.lru_cache(maxsize=1)
def nchwc_block_size() -> int | None:
    """The channel block ORT's CPU provider uses here, read off a probe; None without NCHWc.

    The probe is a 1x1 identity convolution on 32 channels: ORT gives it a blocked output and a
    ``ReorderOutput``; with that removed, the graph output is the blocked buffer itself, whose
    first B values are channels 0..B-1 of the first position.
    """
    c = 32
    weight = numpy_helper.from_array(np.eye(c, dtype=np.float32).reshape(c, c, 1, 1), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c, 2, 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, c, 2, 2])], [weight])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    opt = _optimized(probe.SerializeToString())
    last = [n for n in opt.graph.node if n.op_type == "ReorderOutput"]
    if len(last) != 1 or last[0].output[0] != "y":
        return None
    blocked = last[0].input[0]
    nodes = [n for n in opt.graph.node if n is not last[0]]
    for n in nodes:
        for i, out in enumerate(n.output):
            if out == blocked:
                n.output[i] = "y"
    del opt.graph.node[:]
    opt.graph.node.extend(nodes)
    x = np.arange(c * 4, dtype=np.float32).reshape(1, c, 2, 2)
    flat = _session(opt.SerializeToString()).run(None, {"x": x})[0].reshape(-1)
    nchw = x[0, :, 0, 0]
    block = next((j for j in range(1, c) if flat[j] != nchw[j]), c)
    return block if block in (4, 8, 16, 32) else None


def _static_shape(value: onnx.ValueInfoProto) -> tuple | None:
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 4:
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def _shapes(proto: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception as exc:  # best effort: a tensor without a shape just stays in NCHW
        log.debug("shape inference failed: %s", exc)
        inferred = proto
    g = inferred.graph
    out = {}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        shape = _static_shape(v)
        if shape is not None:
            out[v.name] = shape
    return out


def _to_blocked(arr: np.ndarray, chw: tuple[int, int, int], block: int) -> np.ndarray | None:
    """A constant operand ``[C,H,W]``/``[C,1,1]``/scalar laid out in blocked memory order (as ``[C,H,W]``)."""
    c, h, w = chw
    a = np.asarray(arr)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.size == 1:
        return a.reshape(())
    if a.ndim != 3 or a.shape[0] != c or a.shape[1:] not in ((h, w), (1, 1)):
        return None
    full = np.broadcast_to(a, (c, h, w))
    return np.ascontiguousarray(full.reshape(c // block, block, h, w).transpose(0, 2, 3, 1)).reshape(c, h, w)


def _toposort(nodes: list[onnx.NodeProto], ready: set[str]) -> list[onnx.NodeProto]:
    out, pending, have = [], list(nodes), set(ready)
    while pending:
        rest = []
        for n in pending:
            if all(not i or i in have for i in n.input):
                out.append(n)
                have.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RewriteError("blocked artefact: the optimised graph is not a DAG")
        pending = rest
    return out


def blocked_artifact(proto: onnx.ModelProto, check: Sequence[Mapping[str, np.ndarray]] = (),
                     rtol: float = 1e-5) -> BlockedResult:
    """ORT's optimised CPU graph of `proto`, with its elementwise bounds on the blocked tensors.

    The result computes the same values as `proto` (the same float operations on the same
    elements, in another memory order; a blocked pool may add in another order, so outputs agree
    to float rounding). Every feed in `check` is run through both, and the artefact is refused
    unless every output is within ``rtol`` of `proto`'s (relative to the output's largest value).

    Raises:
        RewriteError: this ONNX Runtime build or CPU has no NCHWc layout, the model is too large
            to pass through memory (external data), or the artefact disagrees on a `check` feed.
    """
    block = nchwc_block_size()
    if block is None:
        raise RewriteError("this ONNX Runtime CPU provider uses no blocked (NCHWc) layout: no CPU artefact to write")
    if proto.ByteSize() > 2**31 - 1:
        raise RewriteError("the model is too large for the blocked CPU artefact (over 2 GB)")
    shapes = _shapes(proto)
    opt = _optimized(proto.SerializeToString())
    g = opt.graph
    consts = {i.name: i for i in g.initializer}
    names = set(consts) | {i.name for i in g.input} | {o for n in g.node for o in n.output}
    count = [0]

    def fresh(base: str) -> str:
        while True:
            count[0] += 1
            name = f"{base}/nchwc{count[0]}"
            if name not in names:
                names.add(name)
                return name

    def const(base: str, value: np.ndarray) -> str:
        name = fresh(base)
        g.initializer.append(numpy_helper.from_array(value, name))
        return name

    nodes = _toposort(list(g.node), {i.name for i in g.input} | set(consts))
    reorders_before = sum(n.op_type in ("ReorderInput", "ReorderOutput") for n in nodes)
    blocked: dict[str, tuple[str, tuple[int, int, int]]] = {}  # NCHW tensor -> (blocked tensor, C,H,W)
    alias: dict[str, str] = {}  # output of a dropped ReorderInput -> the blocked tensor it reads
    new_nodes: list[onnx.NodeProto] = []
    converted = 0
    for n in nodes:
        n.input[:] = [alias.get(i, i) for i in n.input]
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.domain == _NCHWC and n.op_type == "ReorderOutput" and not attrs.get("channels_last", 0):
            shape = shapes.get(n.output[0])
            if shape and None not in shape[1:] and shape[1] == attrs.get("channels") and shape[1] % block == 0:
                blocked[n.output[0]] = (n.input[0], tuple(shape[1:]))
        elif n.domain == _NCHWC and n.op_type == "ReorderInput" and not attrs.get("channels_last", 0) \
                and n.input[0] in blocked:
            alias[n.output[0]] = blocked[n.input[0]][0]
            continue
        elif n.domain == "" and n.op_type == "GlobalAveragePool" and n.input[0] in blocked:
            # ORT's blocked pool writes [N,C,1,1] in NCHW memory order: its NCHW readers stay as they are.
            n.input[0] = blocked[n.input[0]][0]
            n.domain = _NCHWC
        elif n.domain == "" and n.op_type in _WHOLE_REDUCE and n.input[0] in blocked \
                and _reduces_every_element(n, attrs, consts):
            # Over C, H and W at once the blocked buffer holds the same elements per image: the same value.
            n.input[0] = blocked[n.input[0]][0]
        elif n.domain == "" and (n.op_type in _BINARY and len(n.input) == 2 or n.op_type in _UNARY):
            made = _convert(n, blocked, consts, shapes, block, fresh, const)
            if made:
                new_nodes.extend(made)
                converted += 1
        new_nodes.append(n)
    # Drop what nothing reads any more (the NCHW copies the blocked ops replaced).
    needed = {o.name for o in g.output}
    kept = []
    for n in reversed(new_nodes):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(i for i in n.input if i)
    kept.reverse()
    del g.node[:]
    g.node.extend(kept)
    used = {i for n in kept for i in n.input}
    live = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    del opt.metadata_props[:]
    opt.metadata_props.extend(list(proto.metadata_props) + [onnx.StringStringEntryProto(key=BLOCK_KEY,
                                                                                         value=str(block))])
    if check:
        _check(proto, opt, check, rtol)
    after = sum(n.op_type in ("ReorderInput", "ReorderOutput") for n in kept)
    blocked_ops = sum(1 for n in kept if any(o.endswith("/blocked") for o in n.output))
    log.info("blocked CPU artefact: block %d, %d elementwise ops converted (%d kept), reorders %d -> %d",
             block, converted, blocked_ops, reorders_before, after)
    return BlockedResult(opt, block, reorders_before, after, blocked_ops)


def _check(proto: onnx.ModelProto, artefact: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]],
           rtol: float) -> None:
    portable, blocked = _session(proto.SerializeToString()), _session(artefact.SerializeToString())
    for k, feed in enumerate(feeds):
        for name, want, got in zip([o.name for o in portable.get_outputs()], portable.run(None, dict(feed)),
                                   blocked.run(None, dict(feed))):
            scale = float(np.abs(want).max()) if want.size else 0.0
            worst = float(np.abs(got.astype(np.float64) - want).max()) if want.size else 0.0
            if not worst <= rtol * max(scale, 1e-30):
                raise RewriteError(f"blocked artefact: output '{name}' differs from the portable model on "
                                   f"feed {k} by {worst:.3g} (allowed {rtol:g} x {scale:.3g})")


def _reduces_every_element(n: onnx.NodeProto, attrs: dict, consts: dict) -> bool:
    """True when reduction `n` of a 4-D map reduces axes 1, 2 and 3 (its per-image value is then
    independent of how the image's elements are laid out in memory)."""
    if len(n.input) > 1 and n.input[1]:
        if n.input[1] not in consts:
            return False
        axes = [int(a) for a in numpy_helper.to_array(consts[n.input[1]]).reshape(-1)]
    else:
        axes = list(attrs.get("axes", ()))
    return {a % 4 for a in axes} == {1, 2, 3}


def _convert(n: onnx.NodeProto, blocked: dict, consts: dict, shapes: dict, block: int, fresh, const
             ) -> list[onnx.NodeProto] | None:
    """The blocked twin of elementwise node `n` (registered in `blocked`), or None to leave it in NCHW."""
    full = [i for i in n.input if i in blocked]
    if not full:
        return None
    chw = max((blocked[i][1] for i in full), key=lambda s: s[1] * s[2])
    c, h, w = chw
    inputs, vector = [], None
    for k, name in enumerate(n.input):
        if not name:
            inputs.append(name)
        elif name in blocked and blocked[name][1] == chw:
            inputs.append(blocked[name][0])
        elif name in blocked and blocked[name][1] == (c, 1, 1) and n.op_type in _BINARY and vector is None:
            vector = k  # a blocked [N,C,1,1] tensor has the NCHW memory order
            inputs.append(blocked[name][0])
        elif name in consts:
            arr = _to_blocked(numpy_helper.to_array(consts[name]), chw, block)
            if arr is None:
                return None
            inputs.append(const(name, arr))
        elif shapes.get(name, (None,) * 4)[1:] == (c, 1, 1) and n.op_type in _BINARY and vector is None:
            vector = k
            inputs.append(name)
        else:
            return None
    if n.op_type == "Clip" and vector is not None:
        return None
    out = fresh(n.output[0]) + "/blocked"
    blocked[n.output[0]] = (out, chw)
    made = []
    if vector is not None:
        # The factor [N,C,1,1] is already in blocked order (one position); ORT's blocked nearest
        # Upsample spreads it over H x W (one write), and the op runs on two same-shape blocked maps
        # (reshaping to [N,C/B,H*W,B] * [N,C/B,1,B] instead broadcasts in spans of B: 3x slower).
        up = fresh(inputs[vector])
        made.append(helper.make_node("Upsample", [inputs[vector]], [up], name=fresh("upsample"), domain=_NCHWC,
                                     scales=[1, 1, h, w], mode="nearest"))
        inputs[vector] = up
    twin = helper.make_node(n.op_type, inputs, [out], name=fresh(n.name or n.op_type))
    twin.attribute.extend(n.attribute)
    return made + [twin]
