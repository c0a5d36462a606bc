"""Zeroing: make chosen channels of chosen maps output exactly 0.

Where it is provably the same function the zeroing is *folded* into the weights (no extra node at
inference time); everywhere else a ``Mul`` by a constant 0/1 mask is inserted right after the map.
`reference.mask_reference` builds the plain mask model independently, for `verify`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from ..errors import RewriteError
from ..model.load import Model
from ..model.taps import ZERO_PRESERVING, Tap
from .graph import PREFIX, GraphFacts, Names, check_rewritable, export_graph, import_graph, np_dtype, splice_after

log = logging.getLogger(__name__)


#: Ops the zeroing is folded through: f(0) == 0 exactly (structurally: a product with x, a branch on
#: the sign of x, or an odd function), so a channel forced to 0 upstream stays exactly 0.
FOLD_THROUGH = ZERO_PRESERVING | {"Abs", "Neg"}

#: Ops that can force a channel to exactly 0 whatever their input, by zeroing parameters.
RESET_OPS = frozenset({"Conv", "BatchNormalization"})


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
               facts: GraphFacts) -> list[tuple[Tap, tuple[int, ...]]]:
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


def _resolve_chain(facts: GraphFacts, tap: Tap) -> list[tuple[int, int | None]] | str:
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


def _param_edit(facts: GraphFacts, node_idx: int, slot: int, layout: str, chans: frozenset[int],
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


def _reset_edits(facts: GraphFacts, idx: int, tap: Tap,
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


def _after_reset(facts: GraphFacts, idx: int, data_slot: int, tap: Tap,
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


def _plan_chain_fold(facts: GraphFacts, tap: Tap, chans: frozenset[int]) -> _Fold | str:
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


def _plan_gemm_fold(facts: GraphFacts, tap: Tap, chans: frozenset[int]) -> _Fold | str:
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


def _apply_edits(graph: gs.Graph, facts: GraphFacts, names: Names, edits: list[_Edit]) -> dict[str, str]:
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
            clone = gs.Constant(names.fresh(f"{const.name}/{PREFIX}_zeroed"), new_values)
            node.inputs[slot] = clone
            cloned[const.name] = (f"shared initializer '{const.name}' copied, original untouched"
                                  if facts.shared(const.name) else
                                  f"'{const.name}' expanded to one value per channel in a new initializer")
        else:
            const.values = new_values
    return cloned


def _mask_nodes(tap: str, mask: np.ndarray, names: Names) -> Callable[[gs.Variable, gs.Variable], list[gs.Node]]:
    def build(raw: gs.Variable, out: gs.Variable) -> list[gs.Node]:
        const = gs.Constant(names.fresh(f"{PREFIX}/mask/{tap}"), mask)
        return [gs.Node("Mul", names.fresh(f"{PREFIX}/mask/{tap}/Mul"), inputs=[raw, const], outputs=[out])]
    return build


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
    facts = GraphFacts(source)
    work = _validated(taps, channels, facts)
    names = Names(source)
    graph = import_graph(source)

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
        mask = np.ones((1, tap.channels, 1, 1), dtype=np_dtype(tap.name, facts))
        mask[0, list(chans)] = 0
        raw = splice_after(graph, tensors[tap.name], names, _mask_nodes(tap.name, mask, names))
        renamed[raw] = tap.name
        records.append(SurgeryRecord(tap.name, chans, "mask",
                                     f"Mul by [1,{tap.channels},1,1] mask after '{tap.name}' ({reason})"))
    for r in records:
        log.info("zeroed %d channel(s) of %s by %s", len(r.channels), r.tap, r.method)
    return export_graph(graph, source, renamed), records
