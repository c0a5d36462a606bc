"""Stage 2: find the activation maps ("taps") to measure.

A tap is a 4-D tensor `[N, C, H, W]` named by its ONNX tensor name. A *conv map* is the output of a
Conv after the per-channel ops that directly follow it, each the single consumer of the previous
tensor (BatchNormalization, a per-channel bias Add, Relu, Clip, ...). A *merge map* is the same for a
residual Add of two 4-D maps (ResNets). The *last* map is the 4-D tensor that feeds the classifier
head (GlobalAveragePool, Flatten, Gemm, ...), looked through channel-preserving pooling.

A *branch* map is a conv map whose only consumers are residual merges (in a ResNet, the conv+BN
output of each block's last conv and of the shortcut conv, before the Add). `layers="all"` leaves
branches out and `"all+branches"` includes them. Why: a branch is not an activation map of the
network (no activation has been applied; the merge map after the Add, which is measured, holds
its contribution), and tapping it costs more than any other map: ORT fuses Conv+Add(+Relu) into
one kernel only when the conv output has no other consumer, so each tapped branch turns one
kernel back into three and keeps an extra full-size tensor alive (ResNet-50, batch 16: 69 maps
with branches ran at 0.64x plain inference and 1.36x its peak memory; the 49 maps without them at
0.90x and 1.10x; `benchmarks/perf.py`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import NoTapsError, UnsupportedModelError
from .load import Model

log = logging.getLogger(__name__)


#: Per-channel ops with f(0) == 0, so a zero channel stays zero and folds stay exact.
ZERO_PRESERVING = frozenset({"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Tanh", "HardSwish",
                             "Identity", "Dropout", "Celu", "Gelu", "Mish", "Softsign", "ThresholdedRelu"})

#: Elementwise ops that act on each channel independently (the activation map continues through them).
ELEMENTWISE = ZERO_PRESERVING | {"Sigmoid", "HardSigmoid", "Softplus", "Clip", "Erf", "Abs", "Neg"}

#: Ops whose output is non-negative whatever their input.
NON_NEGATIVE = frozenset({"Relu", "Sigmoid", "HardSigmoid", "Softplus", "Abs"})

#: Ops that keep channels but not positions: the classifier head may see a map through them.
CHANNEL_PRESERVING_POOL = frozenset({"MaxPool", "AveragePool", "Identity", "Dropout"})

#: Ops between the last activation map and the head's flattening.
LOOK_THROUGH = CHANNEL_PRESERVING_POOL | {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax"}

#: Ops that start the classifier head when they consume a 4-D map.
HEAD_OPS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "Flatten", "ReduceMean", "ReduceMax",
                      "Reshape", "Gemm", "MatMul"})

#: Layout and pooling ops that TensorFlow and Keras exports put between the last conv map and the
#: head: tf2onnx runs the conv stack in NCHW between Transposes, so the head sees the map as NHWC,
#: pooled, transposed back, reshaped or cast.
LAYOUT_THROUGH = LOOK_THROUGH | {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast"}


@dataclass(frozen=True)
class Tap:
    """One activation map onnx-linf measures."""

    name: str
    """ONNX tensor name of the map (stable id used by CLI, report and library)."""
    channels: int
    """Number of channels C."""
    spatial: tuple[int | None, int | None]
    """(H, W) when known statically, else None entries."""
    kind: str
    """``conv`` (after a Conv), ``branch`` (a conv map that only feeds residual merges), ``merge``
    (after a residual Add), ``head`` (only feeds the head) or ``named`` (asked for by name)."""
    source: str
    """Name of the node that starts the chain (the Conv or the Add)."""
    chain: tuple[str, ...]
    """Names of the nodes from `source` to the node producing the map, in order."""
    non_negative: bool
    """True when the map is provably >= 0 (ends in Relu, Sigmoid, Clip(min >= 0), ...)."""
    is_last: bool = False
    """True for the map that feeds the classifier head."""
    elem_type: int = onnx.TensorProto.FLOAT
    """ONNX element type of the map (float16 in half-precision models; statistics are float32)."""

    @property
    def static_spatial(self) -> bool:
        """True when H and W are both known statically."""
        return all(isinstance(d, int) for d in self.spatial)


class GraphIndex:
    """Producer/consumer lookups and inferred shapes for one graph."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.proto = proto
        graph = proto.graph
        self.nodes = list(graph.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.order: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            self.order[node.name or f"#{i}"] = i
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.initializers = {init.name: init for init in graph.initializer}
        self.constants = {n.output[0]: n for n in self.nodes if n.op_type == "Constant"}
        self.graph_outputs = {o.name for o in graph.output}
        self.shapes, self.types = infer_shapes(proto)

    def node_name(self, node: onnx.NodeProto) -> str:
        """Name of a node, falling back to its position for unnamed nodes."""
        return node.name or f"#{self.nodes.index(node)}"

    def const_value(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant output, else None (external data counts as unknown)."""
        if name in self.initializers:
            init = self.initializers[name]
            if onnx.external_data_helper.uses_external_data(init):
                return None
            return numpy_helper.to_array(init)
        if name in self.constants:
            for attr in self.constants[name].attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def rank(self, name: str) -> int | None:
        """Rank of a tensor from shape inference, or None."""
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)


#: Initializers up to this many elements keep their values in `weightless` copies: shape arguments
#: (Reshape targets, Slice bounds, Resize scales) that data propagation reads, and scalars.
SMALL_INITIALIZER = 1024


def weightless(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model for shape inference, without the bytes of its weights.

    Nodes, opsets, functions, inputs, outputs and value_info are copied; every initializer larger
    than `SMALL_INITIALIZER` elements (and every one with external data) becomes a graph input of
    its type and shape instead. Shape inference needs a weight's type and shape, not its values; on
    the full model ``onnx.shape_inference`` serialises and parses every weight several times
    (measured on a ResNet-50 scan: a transient of 3.8x the weights' size, and the process kept one
    more copy's worth of memory afterwards).
    """
    light = onnx.ModelProto()
    light.ir_version, light.producer_name = proto.ir_version, proto.producer_name
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    graph, g = proto.graph, light.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    g.sparse_initializer.extend(graph.sparse_initializer)
    inputs = {i.name for i in graph.input}
    for init in graph.initializer:
        numel = int(np.prod(init.dims, dtype=np.int64)) if init.dims else 1
        if numel <= SMALL_INITIALIZER and not onnx.external_data_helper.uses_external_data(init):
            g.initializer.append(init)
        elif init.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def infer_shapes(proto: onnx.ModelProto) -> tuple[dict[str, tuple[int | str | None, ...]], dict[str, int]]:
    """Shapes and element types of the graph's tensors, as far as shape inference knows them
    (run on a `weightless` copy)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless(proto), strict_mode=False, data_prop=True)
    except Exception as exc:  # shape inference is best effort: a failure only loses shapes
        log.debug("shape inference failed: %s", exc)
        inferred = proto
    shapes: dict[str, tuple[int | str | None, ...]] = {}
    types: dict[str, int] = {}
    graph = inferred.graph
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = int(tt.elem_type)
        if not tt.HasField("shape"):
            continue
        shapes[vi.name] = tuple(
            int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
    return shapes, types


def _is_per_channel_const(index: GraphIndex, name: str, channels: int | None) -> bool:
    """True if `name` is a constant broadcastable as a per-channel [C,1,1] / [1,C,1,1] operand."""
    value = index.const_value(name)
    if value is None:
        return False
    shape = value.shape
    if value.size == 1:
        return True
    squeezed = [d for d in shape if d != 1]
    if len(squeezed) != 1:
        return False
    # The non-1 dim must be the channel axis: position -3 of a [.., C, 1, 1] broadcast.
    return len(shape) >= 3 and shape[-3] == squeezed[0] and (channels is None or squeezed[0] == channels)


def _continues_map(index: GraphIndex, node: onnx.NodeProto, tensor: str, channels: int | None) -> bool:
    """Whether `node` (the single consumer of `tensor`) is a per-channel op the map continues through."""
    op = node.op_type
    if op in ELEMENTWISE:
        return node.input[0] == tensor
    if op == "BatchNormalization":
        return node.input[0] == tensor and len(node.output) == 1
    if op in ("Add", "Sub", "Mul", "Div"):
        others = [i for i in node.input if i != tensor]
        return len(others) == 1 and _is_per_channel_const(index, others[0], channels)
    return False


def _non_negative(index: GraphIndex, node: onnx.NodeProto) -> bool:
    if node.op_type in NON_NEGATIVE:
        return True
    if node.op_type == "Clip":
        lo = None
        if len(node.input) > 1 and node.input[1]:
            lo = index.const_value(node.input[1])
        for attr in node.attribute:  # opset < 11 keeps min as an attribute
            if attr.name == "min":
                lo = np.array(attr.f)
        return lo is not None and float(np.min(lo)) >= 0.0
    return False


def _channels(index: GraphIndex, start: onnx.NodeProto, tensor: str) -> int | None:
    if start.op_type == "Conv" and len(start.input) > 1:
        weight = index.initializers.get(start.input[1])
        if weight is not None:
            return int(weight.dims[0])
    shape = index.shapes.get(tensor)
    if shape is not None and len(shape) == 4 and isinstance(shape[1], int):
        return shape[1]
    return None


def _follow_chain(index: GraphIndex, start: onnx.NodeProto) -> tuple[str, list[onnx.NodeProto]]:
    """Walk from `start`'s output through single-consumer per-channel ops; return (tensor, chain)."""
    tensor = start.output[0]
    chain = [start]
    channels = _channels(index, start, tensor)
    while tensor not in index.graph_outputs:
        consumers = index.consumers.get(tensor, [])
        gated = _sigmoid_gate(index, tensor, consumers)
        if gated is not None:  # SiLU / Swish: x * sigmoid(x), exported as two nodes
            chain.extend(gated)
            tensor = gated[-1].output[0]
            continue
        if len(consumers) != 1 or not _continues_map(index, consumers[0], tensor, channels):
            break
        chain.append(consumers[0])
        tensor = consumers[0].output[0]
    return tensor, chain


def _sigmoid_gate(index: GraphIndex, tensor: str, consumers: list[onnx.NodeProto]) -> list[onnx.NodeProto] | None:
    """[Sigmoid, Mul] when `tensor` feeds exactly ``Mul(tensor, Sigmoid(tensor))`` and nothing else."""
    if len(consumers) != 2:
        return None
    sig = next((n for n in consumers if n.op_type == "Sigmoid"), None)
    mul = next((n for n in consumers if n.op_type == "Mul"), None)
    if sig is None or mul is None or sig.output[0] in index.graph_outputs:
        return None
    if sorted(mul.input) != sorted([tensor, sig.output[0]]):
        return None
    if index.consumers.get(sig.output[0], []) != [mul]:
        return None
    return [sig, mul]


def _make_tap(index: GraphIndex, kind: str, start: onnx.NodeProto) -> Tap | None:
    tensor, chain = _follow_chain(index, start)
    rank = index.rank(tensor)
    if rank is not None and rank != 4:
        return None
    channels = _channels(index, start, tensor)
    if channels is None:
        log.debug("skipping %s: unknown channel count", tensor)
        return None
    shape = index.shapes.get(tensor, (None, None, None, None))
    spatial = tuple(d if isinstance(d, int) else None for d in shape[2:4]) if len(shape) == 4 else (None, None)
    return Tap(
        name=tensor,
        channels=channels,
        spatial=spatial,  # type: ignore[arg-type]
        kind=kind,
        source=index.node_name(start),
        chain=tuple(index.node_name(n) for n in chain),
        non_negative=_non_negative(index, chain[-1]),
        elem_type=index.types.get(tensor, onnx.TensorProto.FLOAT),
    )


def _is_residual_add(index: GraphIndex, node: onnx.NodeProto) -> bool:
    if node.op_type not in ("Add", "Sum") or len(node.input) < 2:
        return False
    if any(index.const_value(i) is not None for i in node.input):
        return False
    return all(index.rank(i) in (4, None) for i in node.input) and index.rank(node.output[0]) == 4


def _live_tensors(index: GraphIndex) -> set[str]:
    """Tensors that depend on the image input (activations, as opposed to computed weights)."""
    live = {vi.name for vi in index.proto.graph.input if vi.name not in index.initializers}
    for node in index.nodes:  # topological order: one forward pass
        if any(i in live for i in node.input):
            live.update(node.output)
    return live


def _find_head_map(index: GraphIndex) -> str | None:
    """The 4-D activation consumed by the classifier head closest to the graph output."""
    best: tuple[int, str] | None = None
    # Only activations: a weight that nodes compute is 4-D and can feed a head op too (the model
    # zoo's Inception v1 reshapes a ConstantOfShape into its classifier weight).
    live = _live_tensors(index)
    for i, node in enumerate(index.nodes):
        if node.op_type not in HEAD_OPS or not node.input:
            continue
        tensor = node.input[0]
        if index.rank(tensor) != 4 or tensor not in live:
            continue
        if best is None or i > best[0]:
            best = (i, tensor)
    if best is None:
        return None
    tensor = best[1]
    # Look through pooling that keeps channels: MaxPool(relu3) -> Flatten measures relu3, and
    # GlobalAveragePool(relu) -> Flatten measures relu (the post-residual map in a ResNet).
    while tensor in index.producer and index.producer[tensor].op_type in LOOK_THROUGH:
        pool = index.producer[tensor]
        if index.rank(pool.input[0]) != 4 or len(index.consumers.get(pool.input[0], [])) != 1:
            break
        tensor = pool.input[0]
    return tensor


def find_taps(model: Model, layers: str | Sequence[str] = "all") -> list[Tap]:
    """Find the activation maps to measure.

    Args:
        model: the loaded model.
        layers: ``"all"`` (every conv and residual-merge map except branches, see the module
            docstring), ``"all+branches"`` (with them), ``"last"`` (the map feeding the classifier
            head), or a sequence of tensor names.

    Returns:
        Taps in graph (topological) order, without duplicates.

    Raises:
        NoTapsError: the model has no convolutional activation map (or `layers` selects none).
        UnsupportedModelError: a requested tensor name is not a 4-D map of the graph.
    """
    index = GraphIndex(model.proto)
    found: dict[str, Tap] = {}
    for node in index.nodes:
        kind = "conv" if node.op_type == "Conv" else "merge" if _is_residual_add(index, node) else None
        if kind is None:
            continue
        tap = _make_tap(index, kind, node)
        if tap is not None and tap.name not in found:
            found[tap.name] = tap
    if not any(t.kind == "conv" for t in found.values()):
        ops = model.quantized_ops
        if ops:
            raise NoTapsError(f"no float convolutional activation map in {model.path.name}: it is quantized "
                              f"({', '.join(ops[:3])}{', ...' if len(ops) > 3 else ''}); scan the float model "
                              "before quantization")
        raise NoTapsError(f"no convolutional activation map found in {model.path.name}: nothing to scan")

    head = _find_head_map(index)
    if head is not None and head not in found:
        head = _through_layout_ops(index, head, found) or head
        if head not in found and _pooled_or_relaid(index, head):
            log.info("the head reads '%s', a pooled or re-laid-out tensor, not a map: the last map is the "
                     "deepest conv map", head)
            head = None
    if head is None:
        # No recognisable head (a fully convolutional classifier, or one seen only through layout
        # ops that lead to no map): the deepest map.
        head = max(found.values(), key=lambda t: _position(index, t.name)).name
    if head in found:
        found[head] = dataclasses.replace(found[head], is_last=True)
    else:
        tap = _tap_for_tensor(index, head, kind="head")
        if tap is not None:
            found[head] = dataclasses.replace(tap, is_last=True)
    merges = {t.source for t in found.values() if t.kind == "merge"}
    for name, tap in found.items():
        users = index.consumers.get(name, [])
        if tap.kind == "conv" and users and all(index.node_name(u) in merges for u in users):
            found[name] = dataclasses.replace(tap, kind="branch")
    taps = sorted(found.values(), key=lambda t: _position(index, t.name))

    if isinstance(layers, str) and layers == "all+branches":
        return taps
    if isinstance(layers, str) and layers == "all":
        return [t for t in taps if t.kind != "branch"]
    if isinstance(layers, str) and layers == "last":
        last = [t for t in taps if t.is_last]
        if not last:
            # No recognisable head (e.g. a fully convolutional classifier): the deepest conv map.
            last = [taps[-1]]
        return last
    names = [layers] if isinstance(layers, str) else list(layers)
    selected = []
    for name in names:
        if name in found:
            selected.append(found[name])
            continue
        tap = _tap_for_tensor(index, name, kind="named")
        if tap is None:
            known = ", ".join(t.name for t in taps[:8])
            raise UnsupportedModelError(
                f"'{name}' is not a 4-D activation map of this model (known maps: {known}"
                f"{', ...' if len(taps) > 8 else ''})"
            )
        selected.append(tap)
    return selected


def _through_layout_ops(index: GraphIndex, tensor: str, found: dict[str, Tap]) -> str | None:
    """Walk back from a head tensor through Transpose/Reshape/Cast/pooling to a found map, or None."""
    seen: set[str] = set()
    while tensor not in found and tensor in index.producer and tensor not in seen:
        seen.add(tensor)
        node = index.producer[tensor]
        if node.op_type not in LAYOUT_THROUGH or not node.input:
            return None
        tensor = node.input[0]
    return tensor if tensor in found else None


def _pooled_or_relaid(index: GraphIndex, tensor: str) -> bool:
    """True for a tensor that is never a map: pooled (1x1 spatial, or 1 channel) or produced by a
    layout op (an NHWC view after a Transpose, a Reshape), whose axis 1 is not channels."""
    shape = index.shapes.get(tensor)
    producer = index.producer.get(tensor)
    pooled = shape is not None and len(shape) == 4 and ((shape[2] == 1 and shape[3] == 1) or shape[1] == 1)
    return pooled or (producer is not None and producer.op_type in LAYOUT_THROUGH - LOOK_THROUGH)


def _position(index: GraphIndex, tensor: str) -> int:
    producer = index.producer.get(tensor)
    return index.nodes.index(producer) if producer is not None else -1


def _tap_for_tensor(index: GraphIndex, tensor: str, kind: str) -> Tap | None:
    """A tap for an arbitrary 4-D tensor of the graph (explicit names, or a head map)."""
    producer = index.producer.get(tensor)
    if producer is None or index.rank(tensor) not in (4, None):
        return None
    shape = index.shapes.get(tensor)
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int):
        return None
    return Tap(
        name=tensor,
        channels=shape[1],
        spatial=tuple(d if isinstance(d, int) else None for d in shape[2:4]),  # type: ignore[arg-type]
        kind=kind,
        source=index.node_name(producer),
        chain=(index.node_name(producer),),
        non_negative=_non_negative(index, producer),
        elem_type=index.types.get(tensor, onnx.TensorProto.FLOAT),
    )
