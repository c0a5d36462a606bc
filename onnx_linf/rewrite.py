"""Stage 6: graph surgery that removes channels (zeroing) or bounds activations (clamping).

`zero_channels` makes chosen channels of chosen taps exactly 0. Where it is provably the same
function it *folds* the zeroing into the weights (no extra node at inference time); everywhere else
it inserts a ``Mul`` by a constant 0/1 mask right after the tap. `mask_reference` builds the plain
mask model independently (raw protobuf edits, no graphsurgeon, no shared code) so `verify` can
compare the surgery against something a surgery bug cannot also corrupt. `clamp_maps` inserts
``Min``/``Max`` against per-channel or per-position bounds.

Every rewrite keeps the graph's input and output names, types and shapes, the IR version, the
opset imports and the model metadata, and never modifies the input `Model`'s proto.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from .errors import RewriteError, UnsupportedModelError
from .load import Model
from .taps import ZERO_PRESERVING, Tap

log = logging.getLogger(__name__)

#: Ops the zeroing is folded through: f(0) == 0 exactly (structurally: a product with x, a branch on
#: the sign of x, or an odd function), so a channel forced to 0 upstream stays exactly 0.
FOLD_THROUGH = ZERO_PRESERVING | {"Abs", "Neg"}
#: Ops that can force a channel to exactly 0 whatever their input, by zeroing parameters.
RESET_OPS = frozenset({"Conv", "BatchNormalization"})
#: Element types a fold may edit (numpy can represent them exactly).
_FOLDABLE_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})
_PREFIX = "onnx_linf"


@dataclass(frozen=True)
class SurgeryRecord:
    """What `zero_channels` did to one tap."""

    tap: str
    """Tensor name of the tap."""
    channels: tuple[int, ...]
    """Channels zeroed, sorted."""
    method: str
    """``conv-fold``, ``bn-fold``, ``gemm-fold`` or ``mask``."""
    detail: str
    """Human-readable account: which parameters were zeroed, or why a mask was used instead."""


@dataclass(frozen=True, eq=False)
class ClampBound:
    """Bounds for one tap. ``eq=False``: numpy arrays have no single truth value for ``==``."""

    hi: np.ndarray
    """Upper bound, float32, shape ``[C,1,1]`` (per channel) or ``[C,H,W]`` (per position)."""
    lo: np.ndarray | None = None
    """Optional lower bound with the same shape as `hi` (``lo <= hi`` everywhere)."""


@dataclass(frozen=True)
class ClampRecord:
    """What `clamp_maps` did to one tap."""

    tap: str
    """Tensor name of the tap."""
    granularity: str
    """``channel`` (bounds ``[C,1,1]``) or ``position`` (bounds ``[C,H,W]``)."""
    two_sided: bool
    """True when a lower bound was applied as well."""
    elements: int
    """Number of bound values per side (``C`` or ``C*H*W``)."""


# --------------------------------------------------------------------------------------------
# Graph facts, read from the protobuf before any edit
# --------------------------------------------------------------------------------------------


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `graph` and of its subgraphs (If/Loop/Scan bodies), depth first."""
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _walk_nodes(sub)


def _walk_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _walk_graphs(sub)


class _Names:
    """Every node and tensor name in the model, to mint new names that collide with none."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        taken: set[str] = set()
        for graph in _walk_graphs(proto.graph):
            taken.update(i.name for i in graph.initializer)
            taken.update(i.values.name for i in graph.sparse_initializer)
            taken.update(v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info))
            for node in graph.node:
                taken.add(node.name)
                taken.update(node.input)
                taken.update(node.output)
        self.taken = taken

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


class _Facts:
    """Producers, use counts, constants, types and shapes of the (unmodified) model."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        graph = proto.graph
        self.nodes = list(graph.node)
        self.producer: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
        # Uses are counted in subgraphs too: an If/Loop body may read an outer tensor or weight by
        # name without it appearing among the If node's inputs. Over-counting (a subgraph name that
        # shadows an outer one) only makes us more careful.
        self.uses: Counter[str] = Counter()
        for node in _walk_nodes(graph):
            self.uses.update(i for i in node.input if i)
        self.graph_outputs = {o.name for o in graph.output}
        self.uses.update(o.name for o in graph.output)
        # Models with IR version < 4 also list initializers as graph inputs: a caller may feed a
        # different value at run time, so such a "weight" is not a constant we may edit.
        self.graph_inputs = {i.name for i in graph.input}
        self.initializers = {init.name: init for init in graph.initializer}
        self.constant_nodes = {n.output[0]: n for n in self.nodes if n.op_type == "Constant" and n.output}
        self.types, self.shapes = _tensor_types(proto)

    def node_name(self, index: int) -> str:
        """Same naming as `taps.GraphIndex.node_name`: unnamed nodes are ``#<position>``."""
        return self.nodes[index].name or f"#{index}"

    def const_value(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant-node output (external data counts as unknown)."""
        if name in self.initializers:
            init = self.initializers[name]
            return None if uses_external_data(init) else numpy_helper.to_array(init)
        node = self.constant_nodes.get(name)
        if node is not None:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def editable(self, name: str) -> str | None:
        """Why initializer `name` cannot be edited by a fold, or None when it can."""
        init = self.initializers.get(name)
        if init is None:
            return f"'{name}' is not an initializer"
        if uses_external_data(init):
            return f"'{name}' is stored as external data"
        if name in self.graph_inputs:
            return f"'{name}' is also a graph input and can be overridden at run time"
        if name in self.graph_outputs:
            return f"'{name}' is also a graph output"
        if init.data_type not in _FOLDABLE_TYPES:
            return f"'{name}' has element type {onnx.TensorProto.DataType.Name(init.data_type)}"
        return None

    def shared(self, name: str) -> bool:
        """True when more than one node input reads `name` (it must be cloned before editing)."""
        return self.uses[name] > 1


def _tensor_types(proto: onnx.ModelProto) -> tuple[dict[str, int], dict[str, tuple]]:
    """Element types and shapes of the graph's tensors (best effort: shape inference may fail)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception as exc:  # shape inference is best effort; failures only lose type facts
        log.debug("shape inference failed: %s", exc)
        inferred = proto
    types: dict[str, int] = {}
    shapes: dict[str, tuple] = {}
    graph = inferred.graph
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = int(tt.elem_type)
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim)
    for init in graph.initializer:
        types[init.name] = int(init.data_type)
        shapes[init.name] = tuple(init.dims)
    return types, shapes


def check_rewritable(model: Model) -> None:
    """Raise `UnsupportedModelError` for quantized graphs.

    A node inserted between a Conv and its QuantizeLinear breaks ORT's fusion into an integer
    kernel, so the model would run a different (float) path than the one deployed, and its outputs
    change by more than any verification tolerance. Sanitize the float model, then quantize it.
    """
    ops = model.quantized_ops
    if ops:
        raise UnsupportedModelError(
            f"{model.path.name} is quantized ({', '.join(ops[:3])}{', ...' if len(ops) > 3 else ''}): "
            "onnx-linf rewrites float models",
            hint="clamp or prune the float model, then quantize the result")


def _np_dtype(tensor: str, facts: _Facts) -> np.dtype:
    """numpy dtype for constants combined with `tensor` (ONNX Mul/Min/Max need equal types)."""
    elem_type = facts.types.get(tensor)
    if elem_type is None:
        # Shape inference could not type it; classifier maps are float32.
        return np.dtype(np.float32)
    if elem_type not in _FOLDABLE_TYPES:
        raise RewriteError(f"'{tensor}' has element type {onnx.TensorProto.DataType.Name(elem_type)}; "
                           "only float16/float32/float64 maps can be rewritten")
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _channel_list(tap: str, values: Sequence[int], count: int) -> tuple[int, ...]:
    out: list[int] = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise RewriteError(f"channel {v!r} of tap '{tap}' is not an integer")
        c = int(v)
        if not 0 <= c < count:
            raise RewriteError(f"channel {c} of tap '{tap}' is out of range: the map has {count} channels")
        out.append(c)
    dupes = sorted(c for c, n in Counter(out).items() if n > 1)
    if dupes:
        raise RewriteError(f"channel(s) {dupes} listed more than once for tap '{tap}'")
    return tuple(sorted(out))


def _validated(taps: Sequence[Tap], channels: Mapping[str, Sequence[int]],
               facts: _Facts) -> list[tuple[Tap, tuple[int, ...]]]:
    by_name: dict[str, Tap] = {}
    for tap in taps:
        if tap.name in by_name and by_name[tap.name] != tap:
            raise RewriteError(f"tap '{tap.name}' is given twice with different definitions")
        by_name[tap.name] = tap
    unknown = [name for name in channels if name not in by_name]
    if unknown:
        known = ", ".join(list(by_name)[:8]) or "none"
        raise RewriteError(f"unknown tap '{unknown[0]}' (taps given: {known})")
    work: list[tuple[Tap, tuple[int, ...]]] = []
    for tap in by_name.values():  # in the order of `taps`, which is graph order for find_taps
        if tap.name not in channels:
            continue
        if tap.name not in facts.producer:
            raise RewriteError(f"tap '{tap.name}' is not produced by any node of the model's main graph")
        chans = _channel_list(tap.name, channels[tap.name], tap.channels)
        if chans:
            work.append((tap, chans))
    return work


# --------------------------------------------------------------------------------------------
# Fold planning (pure analysis of the original protobuf)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Edit:
    """Zero some entries of the constant feeding input `slot` of node `node`."""

    node: int
    slot: int
    layout: str
    """``axis0`` (Conv weight/bias, BN params, Gemm weight rows), ``axis1`` (Gemm weight columns)
    or ``bcast`` (a [C,1,1]-style operand; a single value is expanded to one per channel)."""
    channels: frozenset[int]
    count: int
    """Channel count C of the tap (the size a ``bcast`` scalar is expanded to)."""


@dataclass(frozen=True)
class _Fold:
    method: str
    edits: tuple[_Edit, ...]
    detail: str


def _resolve_chain(facts: _Facts, tap: Tap) -> list[tuple[int, int | None]] | str:
    """Chain nodes as (node index, slot of the data input from the previous chain node).

    Walks back from the tap through producers and checks the names match `tap.chain`, so a chain
    computed on another model (or with ambiguous node names) cannot steer an edit.
    """
    tensor = tap.name
    resolved: list[tuple[int, int | None]] = []
    for k in range(len(tap.chain) - 1, -1, -1):
        idx = facts.producer.get(tensor)
        if idx is None or facts.node_name(idx) != tap.chain[k]:
            return f"the graph does not match the tap's chain at '{tap.chain[k]}'"
        if k == 0:
            resolved.append((idx, None))
            break
        node = facts.nodes[idx]
        slots = [j for j, name in enumerate(node.input)
                 if name in facts.producer and facts.node_name(facts.producer[name]) == tap.chain[k - 1]]
        if len(slots) != 1:
            return f"cannot tell the data input of '{tap.chain[k]}'"
        tensor = node.input[slots[0]]
        if facts.uses[tensor] != 1 or tensor in facts.graph_outputs:
            return f"intermediate tensor '{tensor}' has other consumers"
        resolved.append((idx, slots[0]))
    resolved.reverse()
    return resolved


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _param_edit(facts: _Facts, node_idx: int, slot: int, layout: str, chans: frozenset[int],
                length: int, axis: int = 0) -> _Edit | str:
    """An edit of a parameter input, or the reason it cannot be edited."""
    node = facts.nodes[node_idx]
    name = node.input[slot] if slot < len(node.input) else ""
    reason = facts.editable(name)
    if reason:
        return reason
    dims = tuple(facts.initializers[name].dims)
    if len(dims) <= axis or dims[axis] != length:
        return f"'{name}' has shape {list(dims)}, expected {length} channels on axis {axis}"
    return _Edit(node_idx, slot, layout, chans, length)


def _reset_edits(facts: _Facts, idx: int, tap: Tap,
                 chans: frozenset[int]) -> tuple[str, list[_Edit], str] | str:
    """Edits that force the channels of reset node `idx` to exactly 0, whatever its input."""
    node = facts.nodes[idx]
    name = facts.node_name(idx)
    edits: list[_Edit] = []
    if node.op_type == "Conv":
        # Output channel c of a (grouped) Conv is sum(W[c] * x) + b[c]: zero W[c] and b[c] -> 0
        # exactly, also through ORT's Conv+BN/activation fusions and Winograd/FFT algorithms
        # (transforms of an all-zero filter are all zero).
        weight = node.input[1] if len(node.input) > 1 else ""
        if weight in facts.initializers and len(facts.initializers[weight].dims) != 4:
            return f"Conv '{name}' is not a 2-D convolution"
        for slot in range(1, min(len(node.input), 3)):
            if not node.input[slot]:
                continue
            edit = _param_edit(facts, idx, slot, "axis0", chans, tap.channels)
            if isinstance(edit, str):
                return f"Conv '{name}': {edit}"
            edits.append(edit)
        what = "weight+bias" if len(edits) == 2 else "weight"
        return "conv-fold", edits, f"zeroed output channels of Conv '{name}' {what}"
    # BatchNormalization: y = gamma * (x - mean) / sqrt(var + eps) + beta. Zeroing the conv before
    # it is not enough (BN(0) = beta - mean * gamma / sqrt(var + eps)); zeroing gamma and beta
    # gives y = 0 * (x - mean) / s + 0 = 0 for any finite x, and also survives ORT folding the BN
    # into the Conv (fused W' = W * 0, b' = (b - mean) * 0 + 0). We leave the Conv untouched, so the
    # fold works even when the Conv's weights are computed or shared.
    if len(node.output) != 1 or _attr(node, "training_mode", 0):
        return f"BatchNormalization '{name}' runs in training mode"
    if _attr(node, "spatial", 1) == 0:  # opset < 9 per-activation BN: params are [C,H,W]
        return f"BatchNormalization '{name}' is not spatial"
    for slot in (1, 2):
        edit = _param_edit(facts, idx, slot, "axis0", chans, tap.channels)
        if isinstance(edit, str):
            return f"BatchNormalization '{name}': {edit}"
        if len(facts.initializers[node.input[slot]].dims) != 1:
            return f"BatchNormalization '{name}': parameters are not 1-D"
        edits.append(edit)
    return "bn-fold", edits, f"zeroed scale (gamma) and bias (beta) of BatchNormalization '{name}' for these channels"


def _is_bcast_const(shape: tuple[int, ...], channels: int) -> bool:
    """True for a constant that broadcasts per channel against [N,C,H,W] without changing its shape."""
    size = int(np.prod(shape)) if shape else 1
    if size == 1:
        return len(shape) <= 4
    if len(shape) not in (3, 4) or shape[-3] != channels:
        return False
    return all(d == 1 for i, d in enumerate(shape) if i != len(shape) - 3)


def _after_reset(facts: _Facts, idx: int, data_slot: int, tap: Tap,
                 chans: frozenset[int]) -> list[_Edit] | str:
    """Check node `idx` maps an exact-0 channel to exact 0; return the edits that make it do so."""
    node = facts.nodes[idx]
    op = node.op_type
    name = facts.node_name(idx)
    if op in FOLD_THROUGH:
        if data_slot != 0:
            return f"{op} '{name}' reads the map as a parameter"
        if op == "PRelu":  # PRelu(0) = slope * 0: 0 only for a finite slope
            slope = facts.const_value(node.input[1])
            if slope is None or not np.all(np.isfinite(slope)):
                return f"PRelu '{name}' has a non-constant or non-finite slope"
        return []
    if op == "Clip":
        if data_slot != 0:
            return f"Clip '{name}' reads the map as a parameter"
        bounds = [_attr(node, "min"), _attr(node, "max")]  # opset < 11 keeps them as attributes
        for k, operand in enumerate(node.input[1:3]):
            if operand:
                value = facts.const_value(operand)
                if value is None or value.size != 1:
                    return f"Clip '{name}' has non-constant bounds"
                bounds[k] = float(value.reshape(()))
        lo, hi = bounds
        if (lo is not None and lo > 0) or (hi is not None and hi < 0):
            return f"Clip '{name}' does not map 0 to 0 (bounds {lo}, {hi})"
        return []
    if op in ("Add", "Sub", "Mul", "Div") and len(node.input) == 2:
        slot = 1 - data_slot
        operand = node.input[slot]
        value = facts.const_value(operand)
        if value is None:
            return f"{op} '{name}' has a non-constant operand"
        if op == "Mul":
            # 0 * c == 0 for any finite c: nothing to edit.
            return [] if np.all(np.isfinite(value)) else f"Mul '{name}' has a non-finite factor"
        if op == "Div":
            if data_slot != 0:
                return f"Div '{name}' divides by the map"
            ok = np.all(value != 0) and not np.any(np.isnan(value))
            return [] if ok else f"Div '{name}' divides by 0 or NaN"
        # Add / Sub (either operand order): 0 + c and c - 0 are c, so zero c for the channels.
        if not _is_bcast_const(tuple(value.shape), tap.channels):
            return f"{op} '{name}' operand is not a per-channel constant"
        flat = np.broadcast_to(value.reshape(-1), (tap.channels,)) if value.size == 1 else value.reshape(-1)
        if all(flat[c] == 0 for c in chans):
            return []
        reason = facts.editable(operand)
        if reason:
            return f"{op} '{name}': {reason}"
        return [_Edit(idx, slot, "bcast", chans, tap.channels)]
    return f"{op} '{name}' does not provably map 0 to 0"


def _plan_chain_fold(facts: _Facts, tap: Tap, chans: frozenset[int]) -> _Fold | str:
    chain = _resolve_chain(facts, tap)
    if isinstance(chain, str):
        return chain
    reset = max((k for k, (idx, _) in enumerate(chain) if facts.nodes[idx].op_type in RESET_OPS), default=None)
    if reset is None:
        return "no Conv or BatchNormalization in the chain"
    planned = _reset_edits(facts, chain[reset][0], tap, chans)
    if isinstance(planned, str):
        return planned
    method, edits, detail = planned
    extra: list[str] = []
    for idx, slot in chain[reset + 1:]:
        more = _after_reset(facts, idx, slot, tap, chans)
        if isinstance(more, str):
            return more
        edits.extend(more)
        extra.extend(f"{facts.nodes[e.node].op_type} '{facts.node_name(e.node)}'" for e in more)
    if extra:
        detail += f" and the constant of {', '.join(extra)}"
    return _Fold(method, tuple(edits), detail)


def _plan_gemm_fold(facts: _Facts, tap: Tap, chans: frozenset[int]) -> _Fold | str:
    """tap -> GlobalAverage/MaxPool -> Flatten(axis=1) -> Gemm, each the only consumer: zero the
    Gemm weight's input columns. The pooled value of a masked channel would be 0 and its term in
    the Gemm sum 0 * w; with the fold it is pooled * 0: the same ±0 in the same sum."""
    path: list[int] = []
    tensor = tap.name
    for ops in (("GlobalAveragePool", "GlobalMaxPool"), ("Flatten",), ("Gemm",)):
        if facts.uses[tensor] != 1 or tensor in facts.graph_outputs:
            return f"'{tensor}' has other consumers"
        idx = next((i for i, n in enumerate(facts.nodes) if tensor in n.input), None)
        if idx is None or facts.nodes[idx].op_type not in ops or facts.nodes[idx].input[0] != tensor:
            return "the map does not feed GlobalPool -> Flatten -> Gemm"
        path.append(idx)
        tensor = facts.nodes[idx].output[0]
    flatten, gemm = facts.nodes[path[1]], facts.nodes[path[2]]
    if _attr(flatten, "axis", 1) != 1 or _attr(gemm, "transA", 0) != 0:
        return "the Flatten/Gemm layout is not [N, C] x W"
    trans_b = _attr(gemm, "transB", 0)
    edit = _param_edit(facts, path[2], 1, "axis1" if trans_b else "axis0", chans, tap.channels,
                       axis=1 if trans_b else 0)
    if isinstance(edit, str):
        return f"Gemm '{facts.node_name(path[2])}': {edit}"
    detail = (f"zeroed the channels' input {'columns' if trans_b else 'rows'} of Gemm "
              f"'{facts.node_name(path[2])}' weight (the tap itself keeps its values)")
    return _Fold("gemm-fold", (edit,), detail)


# --------------------------------------------------------------------------------------------
# graphsurgeon edits
# --------------------------------------------------------------------------------------------


def _import(proto: onnx.ModelProto) -> gs.Graph:
    # graphsurgeon exports not-yet-loaded initializers by reusing the *imported* TensorProto
    # objects: import from a private copy so nothing we do can reach the caller's model.
    private = onnx.ModelProto()
    private.CopyFrom(proto)
    return gs.import_onnx(private)


def _zeroed(values: np.ndarray, layout: str, chans: Sequence[int], count: int) -> np.ndarray:
    arr = np.array(values, copy=True)
    idx = sorted(chans)
    if layout == "axis0":
        arr[idx] = 0
    elif layout == "axis1":
        arr[:, idx] = 0
    else:  # bcast: [C,1,1] / [1,C,1,1] (flat index == channel), or one value for all channels
        if arr.size == 1:
            # Expanding to [C,1,1] (or [1,C,1,1] for a 4-D constant) broadcasts against the
            # [N,C,H,W] map to the same output shape, so the node's output shape is unchanged.
            shape = (1, count, 1, 1) if arr.ndim == 4 else (count, 1, 1)
            arr = np.full(shape, arr.reshape(()), dtype=arr.dtype)
        flat = arr.reshape(-1)  # a view: `arr` is a fresh C-contiguous copy
        flat[idx] = 0
    return arr


def _apply_edits(graph: gs.Graph, facts: _Facts, names: _Names, edits: list[_Edit]) -> dict[str, str]:
    """Apply parameter edits, merged per node input; return {initializer: why it was copied}.

    Overlapping taps (a named intermediate map and the conv map after it) may edit the same input:
    merging first applies the union of their channels once, to one copy.
    """
    merged: dict[tuple[int, int], tuple[_Edit, set[int]]] = {}
    for e in edits:
        first, chans = merged.setdefault((e.node, e.slot), (e, set()))
        if first.layout != e.layout:
            raise AssertionError(f"conflicting edits of input {e.slot} of node {e.node}")
        chans.update(e.channels)
    cloned: dict[str, str] = {}
    for (node_idx, slot), (first, chans) in merged.items():
        node = graph.nodes[node_idx]
        const = node.inputs[slot]
        if not isinstance(const, gs.Constant) or [t.name for t in node.outputs] != list(facts.nodes[node_idx].output):
            raise AssertionError(f"graphsurgeon node order differs from the model at node {node_idx}")
        new_values = _zeroed(const.values, first.layout, sorted(chans), first.count)
        if facts.shared(const.name) or new_values.shape != tuple(const.shape):
            # Copy-on-write: the initializer feeds other nodes too, so this node gets its own edited
            # copy and the original stays as it was for the others. A constant that must change
            # shape (one value expanded per channel) is copied as well, so no reader of the old
            # name sees a new shape.
            clone = gs.Constant(names.fresh(f"{const.name}/{_PREFIX}_zeroed"), new_values)
            node.inputs[slot] = clone
            cloned[const.name] = (f"shared initializer '{const.name}' copied, original untouched"
                                  if facts.shared(const.name) else
                                  f"'{const.name}' expanded to one value per channel in a new initializer")
        else:
            const.values = new_values
    return cloned


def _splice_after(graph: gs.Graph, tensor: gs.Variable, names: _Names,
                  build: Callable[[gs.Variable, gs.Variable], list[gs.Node]]) -> str:
    """Insert nodes right after `tensor`'s producer so that they read the producer's value and
    *write `tensor` itself*.

    The producer is given a fresh output; the original tensor object, with its name, type and every
    reference to it (consumers, subgraphs reading it from outer scope, graph outputs), now holds the
    spliced result. Nothing needs rewiring, and graph output names stay unchanged by construction.
    """
    producer = tensor.inputs[0]
    raw = gs.Variable(names.fresh(f"{_PREFIX}/raw/{tensor.name}"), dtype=tensor.dtype, shape=tensor.shape)
    producer.outputs[producer.outputs.index(tensor)] = raw
    nodes = build(raw, tensor)
    pos = graph.nodes.index(producer) + 1
    graph.nodes[pos:pos] = nodes  # right after the producer: keeps topological order
    return raw.name


def _export(graph: gs.Graph, source: onnx.ModelProto, renamed: Mapping[str, str]) -> onnx.ModelProto:
    """Export and restore what graphsurgeon does not round-trip.

    `gs.export_onnx` rebuilds the model with `onnx.helper.make_model`: it drops metadata_props,
    doc_string, domain and model_version, may rewrite opset_import from the opsets it saw, keeps
    only initializers some node reads, and exports nodes without doc_string/metadata_props. Graph
    inputs and outputs are unchanged by our edits, so their ValueInfos are copied back verbatim.
    """
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = source.ir_version
    del out.opset_import[:]
    out.opset_import.extend(source.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, field, getattr(source, field))
    del out.metadata_props[:]
    out.metadata_props.extend(source.metadata_props)
    del out.functions[:]
    out.functions.extend(source.functions)  # never edited: the originals are the exact truth
    del out.training_info[:]
    out.training_info.extend(source.training_info)

    g, sg = out.graph, source.graph
    g.name, g.doc_string = sg.name, sg.doc_string
    del g.input[:]
    g.input.extend(sg.input)
    del g.output[:]
    g.output.extend(sg.output)
    if hasattr(sg, "metadata_props"):  # GraphProto.metadata_props exists from onnx 1.16 (IR 10)
        del g.metadata_props[:]
        g.metadata_props.extend(sg.metadata_props)
    # The export drops initializers no node reads. Put back those the source did not read either
    # (they are part of the model as given); ones our copy-on-write edits orphaned stay dropped.
    have = {i.name for i in g.initializer}
    read = {name for node in _walk_nodes(sg) for name in node.input}
    g.initializer.extend(i for i in sg.initializer if i.name not in have and i.name not in read)
    # Node attributes, doc strings and metadata from the source; inputs/outputs from the edit.
    originals = {tuple(n.output): n for n in sg.node if n.output}
    for node in g.node:
        key = tuple(renamed.get(o, o) for o in node.output)
        orig = originals.get(key)
        # Our new nodes have fresh names, so a node that writes a tap's name (the mask Mul) is
        # never mistaken for the tap's original producer.
        if orig is None or orig.name != node.name or orig.op_type != node.op_type:
            continue
        restored = onnx.NodeProto()
        restored.CopyFrom(orig)
        del restored.input[:]
        restored.input.extend(node.input)
        del restored.output[:]
        restored.output.extend(node.output)
        node.CopyFrom(restored)
    return out


def _mask_nodes(tap: str, mask: np.ndarray, names: _Names) -> Callable[[gs.Variable, gs.Variable], list[gs.Node]]:
    def build(raw: gs.Variable, out: gs.Variable) -> list[gs.Node]:
        const = gs.Constant(names.fresh(f"{_PREFIX}/mask/{tap}"), mask)
        return [gs.Node("Mul", names.fresh(f"{_PREFIX}/mask/{tap}/Mul"), inputs=[raw, const], outputs=[out])]
    return build


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def zero_channels(model: Model, taps: Sequence[Tap], channels: Mapping[str, Sequence[int]], *,
                  fold: bool = True, fold_gemm: bool = False) -> tuple[onnx.ModelProto, list[SurgeryRecord]]:
    """Return a new ModelProto where the listed channels of each tap output exactly 0.

    A tap whose chain starts at a Conv (or contains a BatchNormalization) followed only by ops
    with f(0) = 0 gets the zeroing folded into the last Conv or BatchNormalization of the chain
    (``conv-fold`` / ``bn-fold``); per-channel Add/Sub constants after it are zeroed as well.
    Parameters shared with other nodes are cloned, never edited in place. Anything else gets a
    ``Mul`` by a constant ``[1,C,1,1]`` 0/1 mask right after the tap (``mask``); the masked
    tensor keeps the tap's name, so consumers, graph outputs and later scans see the masked map.

    Args:
        model: the loaded model (its proto is not modified).
        taps: the model's taps (from `find_taps`); only those named in `channels` are touched.
        channels: tap name -> channel indices to zero. An empty list leaves the tap alone.
        fold: fold into weights where exact; False always uses masks.
        fold_gemm: also allow ``gemm-fold`` when a tap that cannot be folded upstream only feeds
            GlobalPool -> Flatten -> Gemm: the Gemm weight columns are zeroed instead. The model's
            outputs are the same as with a mask, but the tap tensor itself keeps its values, so
            this is off by default (a re-scan of the rewritten model would still see them).

    Returns:
        The rewritten model and one `SurgeryRecord` per tap with channels, in the order of `taps`.

    Raises:
        RewriteError: unknown tap, tap not in the graph, channel not an integer, out of range or
            listed twice.
    """
    check_rewritable(model)
    source = model.proto
    facts = _Facts(source)
    work = _validated(taps, channels, facts)
    names = _Names(source)
    graph = _import(source)

    plans: list[tuple[Tap, tuple[int, ...], _Fold | None, str]] = []
    for tap, chans in work:
        plan: _Fold | str = "folding disabled"
        if fold:
            plan = _plan_chain_fold(facts, tap, frozenset(chans))
            if isinstance(plan, str) and fold_gemm:
                upstream = plan
                plan = _plan_gemm_fold(facts, tap, frozenset(chans))
                if isinstance(plan, str):
                    plan = f"{upstream}; {plan}"
        if isinstance(plan, str):
            log.debug("tap %s: mask (%s)", tap.name, plan)
            plans.append((tap, chans, None, plan))
        else:
            plans.append((tap, chans, plan, ""))

    if model.opset and model.opset < 7 and any(plan is None for _, _, plan, _ in plans):
        raise RewriteError(f"masks need opset >= 7 (broadcasting Mul); the model has opset {model.opset}")
    edits = [e for _, _, plan, _ in plans if plan is not None for e in plan.edits]
    cloned = _apply_edits(graph, facts, names, edits)

    tensors = graph.tensors()
    renamed: dict[str, str] = {}
    records: list[SurgeryRecord] = []
    for tap, chans, plan, reason in plans:
        if plan is not None:
            detail = plan.detail
            copies = [cloned[n] for n in sorted({facts.nodes[e.node].input[e.slot] for e in plan.edits})
                      if n in cloned]
            if copies:
                detail += f" ({'; '.join(copies)})"
            records.append(SurgeryRecord(tap.name, chans, plan.method, detail))
            continue
        mask = np.ones((1, tap.channels, 1, 1), dtype=_np_dtype(tap.name, facts))
        mask[0, list(chans)] = 0
        raw = _splice_after(graph, tensors[tap.name], names, _mask_nodes(tap.name, mask, names))
        renamed[raw] = tap.name
        records.append(SurgeryRecord(tap.name, chans, "mask",
                                     f"Mul by [1,{tap.channels},1,1] mask after '{tap.name}' ({reason})"))
    for r in records:
        log.info("zeroed %d channel(s) of %s by %s", len(r.channels), r.tap, r.method)
    return _export(graph, source, renamed), records


def mask_reference(model: Model, channels: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """Independent reference for verification: the original model with each tap multiplied by a
    constant ``[1,C,1,1]`` 0/1 mask.

    Built with plain protobuf edits and its own helpers (no graphsurgeon, nothing shared with
    `zero_channels`) so that a bug in the surgery cannot hide in the reference: the producer of
    each tap writes a fresh tensor and a ``Mul`` writes the tap's name, so every reader of the tap
    sees the masked value.

    Args:
        model: the loaded model (its proto is not modified).
        channels: tensor name -> channel indices to zero (empty lists are skipped).

    Returns:
        The reference model.

    Raises:
        RewriteError: unknown tensor, unknown channel count, channel out of range or repeated.
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False).graph
    except Exception:  # best effort: a failure leaves channel counts unknown (reported below)
        inferred = graph
    info = {vi.name: vi.type.tensor_type for vi in list(inferred.value_info) + list(inferred.output)}
    taken: set[str] = set()
    pending = [graph]
    while pending:  # names in subgraphs too, so a new name cannot shadow or be shadowed
        g = pending.pop()
        taken |= {i.name for i in g.initializer} | {i.name for i in list(g.input) + list(g.output)}
        for node in g.node:
            taken |= set(node.input) | set(node.output) | {node.name}
            pending.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
            pending.extend(sub for a in node.attribute for sub in a.graphs)

    def new_name(base: str) -> str:
        k = 0
        while f"{base}.{k}" in taken:
            k += 1
        taken.add(f"{base}.{k}")
        return f"{base}.{k}"

    for name, wanted in channels.items():
        wanted = [operator.index(c) for c in wanted]
        if not wanted:
            continue
        producer = next((k for k, node in enumerate(graph.node) if name in node.output), None)
        if producer is None:
            raise RewriteError(f"mask reference: no node of the main graph produces '{name}'")
        tt = info.get(name)
        dims = list(tt.shape.dim) if tt is not None and tt.HasField("shape") else []
        if len(dims) != 4 or not dims[1].HasField("dim_value"):
            raise RewriteError(f"mask reference: channel count of '{name}' is unknown")
        count = dims[1].dim_value
        if len(set(wanted)) != len(wanted) or min(wanted) < 0 or max(wanted) >= count:
            raise RewriteError(f"mask reference: bad channel list {wanted} for '{name}' ({count} channels)")
        elem = tt.elem_type or onnx.TensorProto.FLOAT
        mask = np.ones((1, count, 1, 1), dtype=helper.tensor_dtype_to_np_dtype(elem))
        mask[0, wanted] = 0
        raw, mask_name = new_name(f"reference_raw/{name}"), new_name(f"reference_mask/{name}")
        node = graph.node[producer]
        node.output[list(node.output).index(name)] = raw
        graph.initializer.append(numpy_helper.from_array(mask, mask_name))
        graph.node.insert(producer + 1, helper.make_node("Mul", [raw, mask_name], [name],
                                                         name=new_name(f"reference_mul/{name}")))
    return proto


def _bound_array(tap: str, which: str, value: np.ndarray, dtype: np.dtype,
                 shape: tuple | None) -> tuple[np.ndarray, str]:
    arr = np.asarray(value)
    if arr.ndim != 3:
        raise RewriteError(f"clamp bound {which} of '{tap}' must be [C,1,1] or [C,H,W], got shape {list(arr.shape)}")
    if np.isnan(arr).any():
        raise RewriteError(f"clamp bound {which} of '{tap}' contains NaN")
    granularity = "channel" if arr.shape[1:] == (1, 1) else "position"
    if shape is not None and len(shape) == 4:
        c, h, w = shape[1:]
        if c is not None and arr.shape[0] != c:
            raise RewriteError(f"clamp bound {which} of '{tap}' has {arr.shape[0]} channels, the map has {c}")
        if granularity == "position":
            if h is None or w is None:
                raise RewriteError(f"per-position bounds need a static spatial size; '{tap}' has none")
            if arr.shape[1:] != (h, w):
                raise RewriteError(f"clamp bound {which} of '{tap}' has spatial shape {list(arr.shape[1:])}, "
                                   f"the map is {[h, w]}")
    cast = arr.astype(dtype, copy=False)
    if cast.dtype != arr.dtype and cast.dtype.kind == "f":
        # Round outwards, never inwards: a bound rounded to nearest (float16) could cut a value
        # the calibration images produced.
        direction = np.inf if which == "hi" else -np.inf
        short = cast.astype(arr.dtype) < arr if which == "hi" else cast.astype(arr.dtype) > arr
        cast = np.where(short, np.nextafter(cast, np.asarray(direction, dtype=cast.dtype)), cast)
    return cast, granularity


def clamp_maps(model: Model, bounds: Mapping[str, ClampBound]) -> tuple[onnx.ModelProto, list[ClampRecord]]:
    """Insert ``Min(a, hi)`` (and ``Max(., lo)`` when `lo` is given) right after each tap.

    The clamped tensor keeps the tap's name, so every consumer of the tap, and a graph output
    named after it, reads the clamped value. ``Min`` returns one of its operands unchanged, so on
    data whose activations never exceed `hi` (e.g. `hi` = the maximum over that data) the model's
    outputs are bit-for-bit unchanged.

    Args:
        model: the loaded model (its proto is not modified).
        bounds: tap tensor name -> bounds, float32 ``[C,1,1]`` or ``[C,H,W]``.

    Returns:
        The rewritten model and one `ClampRecord` per tap, in the order of `bounds`.

    Raises:
        RewriteError: unknown tensor, bound of the wrong shape or with NaN, ``lo > hi`` somewhere,
            or an opset older than 8 (no broadcasting Min/Max).
    """
    check_rewritable(model)
    if model.opset and model.opset < 8:
        raise RewriteError(f"clamping needs opset >= 8 (broadcasting Min/Max); the model has opset {model.opset}")
    source = model.proto
    facts = _Facts(source)
    names = _Names(source)
    graph = _import(source)
    tensors = graph.tensors()
    renamed: dict[str, str] = {}
    records: list[ClampRecord] = []
    for tap, bound in bounds.items():
        if tap not in facts.producer:
            raise RewriteError(f"unknown tap '{tap}': no node of the main graph produces it")
        dtype = _np_dtype(tap, facts)
        shape = facts.shapes.get(tap)
        hi, granularity = _bound_array(tap, "hi", bound.hi, dtype, shape)
        lo = None
        if bound.lo is not None:
            lo, _ = _bound_array(tap, "lo", bound.lo, dtype, shape)
            if lo.shape != hi.shape:
                raise RewriteError(f"clamp bounds of '{tap}' differ in shape: lo {list(lo.shape)}, hi {list(hi.shape)}")
            if (lo > hi).any():
                raise RewriteError(f"clamp bounds of '{tap}' have lo > hi at {int((lo > hi).sum())} element(s)")

        def build(raw: gs.Variable, out: gs.Variable, tap: str = tap, hi: np.ndarray = hi,
                  lo: np.ndarray | None = lo) -> list[gs.Node]:
            hi_c = gs.Constant(names.fresh(f"{_PREFIX}/clamp_hi/{tap}"), hi)
            if lo is None:
                return [gs.Node("Min", names.fresh(f"{_PREFIX}/clamp/{tap}/Min"), inputs=[raw, hi_c], outputs=[out])]
            mid = gs.Variable(names.fresh(f"{_PREFIX}/clamp/{tap}/below_hi"), dtype=out.dtype, shape=out.shape)
            lo_c = gs.Constant(names.fresh(f"{_PREFIX}/clamp_lo/{tap}"), lo)
            return [gs.Node("Min", names.fresh(f"{_PREFIX}/clamp/{tap}/Min"), inputs=[raw, hi_c], outputs=[mid]),
                    gs.Node("Max", names.fresh(f"{_PREFIX}/clamp/{tap}/Max"), inputs=[mid, lo_c], outputs=[out])]

        renamed[_splice_after(graph, tensors[tap], names, build)] = tap
        records.append(ClampRecord(tap, granularity, lo is not None, int(hi.size)))
        log.info("clamped %s per %s (%s)", tap, granularity, "two-sided" if lo is not None else "upper")
    return _export(graph, source, renamed), records
