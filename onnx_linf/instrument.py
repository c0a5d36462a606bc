"""Stage 3: add in-graph per-channel reductions of each tap as extra graph outputs.

Each batch then returns `C` floats per image per statistic instead of the `C*H*W` activation.

Why this survives ONNX Runtime's graph optimisations: a tap is the *end* of a Conv->BN->act chain,
so the fusions ORT applies (Conv+BN folding, Conv+activation fusion, NCHWc layout transforms)
still produce the tapped tensor as their output; our reduction is just one more consumer of it.
Fusions that need the fused intermediate to have a single consumer cannot swallow a tapped tensor,
because adding our consumer breaks that precondition. We therefore keep optimisations on (turning
them off costs about a third of the throughput on ResNets) and prove exactness with the
differential tests (`tests/test_instrument.py`) instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .load import Model
from .taps import Tap

#: Per-image, per-channel statistics: output shape [N, C].
CHANNEL_STATS = ("linf", "l1", "l2")
#: Per-batch, per-position extremes over the batch axis: output shape [C, H, W].
POSITION_STATS = ("pos_max", "pos_min")
#: Per-batch per-channel extremes over batch and space: output shape [C].
BATCH_STATS = ("chan_max", "chan_min")
#: Per-batch k largest / smallest values over the batch axis at each position: [min(k, n), C, H, W].
#: Streaming quantiles of clamp bounds come from these (see `stats.TopK`).
TOPK_STATS = ("pos_top", "pos_bottom")
#: Per-image per-channel max / min over H, W (signed, no Abs): output shape [N, C].
IMAGE_STATS = ("img_max", "img_min")
#: The whole activation, for tests and debugging only: shape [N, C, H, W].
RAW = "raw"
ALL_STATS = CHANNEL_STATS + POSITION_STATS + BATCH_STATS + TOPK_STATS + IMAGE_STATS + (RAW,)

_PREFIX = "onnx_linf"


@dataclass(frozen=True)
class TapOutput:
    """What one added graph output holds."""

    tap: str
    """Tensor name of the tap."""
    stat: str
    """One of `ALL_STATS`."""


@dataclass(frozen=True)
class Instrumented:
    """A model with reduction outputs added."""

    proto: onnx.ModelProto
    """The instrumented model (the input model's proto is not modified)."""
    outputs: dict[str, TapOutput]
    """Added graph output name -> (tap, statistic). Explicit, so nobody parses names."""
    original_outputs: tuple[str, ...]
    """Names of the model's own outputs (still present, first)."""

    def output_names(self) -> list[str]:
        """Added output names, in graph order."""
        return list(self.outputs)


class _Builder:
    """Creates reduction nodes with the signature the model's opset wants."""

    def __init__(self, opset: int, topk: int = 1) -> None:
        self.opset = opset
        self.topk = topk
        self.initializers: list[TensorProto] = []
        self._axes: dict[tuple[int, ...], str] = {}
        self.counter = 0

    def uid(self, base: str) -> str:
        self.counter += 1
        return f"{_PREFIX}/{self.counter}/{base}"

    def axes_input(self, axes: tuple[int, ...]) -> str:
        if axes not in self._axes:
            name = f"{_PREFIX}/axes_{'_'.join(map(str, axes))}"
            self.initializers.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), name))
            self._axes[axes] = name
        return self._axes[axes]

    def reduce(self, op: str, x: str, axes: tuple[int, ...], out: str) -> onnx.NodeProto:
        # ReduceMax/Min/L1/L2 take `axes` as an attribute up to opset 17 and as an input from
        # opset 18 on (ReduceSum switched earlier, at 13; we do not use it).
        if self.opset >= 18:
            return helper.make_node(op, [x, self.axes_input(axes)], [out], keepdims=0, name=self.uid(op))
        return helper.make_node(op, [x], [out], axes=list(axes), keepdims=0, name=self.uid(op))

    def topk_nodes(self, x: str, out: str, largest: bool) -> list[onnx.NodeProto]:
        """TopK over the batch axis with K = min(k, batch): a last batch may be smaller than k."""
        k_name = f"{_PREFIX}/topk_k"
        if not any(init.name == k_name for init in self.initializers):
            self.initializers.append(numpy_helper.from_array(np.array([self.topk], dtype=np.int64), k_name))
            self.initializers.append(numpy_helper.from_array(np.array([0], dtype=np.int64), f"{_PREFIX}/zero1"))
            self.initializers.append(numpy_helper.from_array(np.array([1], dtype=np.int64), f"{_PREFIX}/one1"))
        shape, n, k, idx = self.uid("shape"), self.uid("n"), self.uid("k"), self.uid("idx")
        # Shape -> Slice keeps opset 11..14 working (Shape's start/end attributes came in 15).
        return [
            helper.make_node("Shape", [x], [shape], name=self.uid("Shape")),
            helper.make_node("Slice", [shape, f"{_PREFIX}/zero1", f"{_PREFIX}/one1"], [n], name=self.uid("Slice")),
            helper.make_node("Min", [n, k_name], [k], name=self.uid("Min")),
            helper.make_node("TopK", [x, k], [out, idx], axis=0, largest=int(largest), sorted=0,
                             name=self.uid("TopK")),
        ]

    def nodes_for(self, tap: Tap, stat: str, out: str) -> list[onnx.NodeProto]:
        x = tap.name
        if stat == "linf":
            if tap.non_negative:
                return [self.reduce("ReduceMax", x, (2, 3), out)]
            absx = self.uid("abs")
            return [helper.make_node("Abs", [x], [absx], name=self.uid("Abs")),
                    self.reduce("ReduceMax", absx, (2, 3), out)]
        if stat == "l1":
            return [self.reduce("ReduceL1", x, (2, 3), out)]
        if stat == "l2":
            return [self.reduce("ReduceL2", x, (2, 3), out)]
        if stat == "pos_max":
            return [self.reduce("ReduceMax", x, (0,), out)]
        if stat == "pos_min":
            return [self.reduce("ReduceMin", x, (0,), out)]
        if stat == "chan_max":
            return [self.reduce("ReduceMax", x, (0, 2, 3), out)]
        if stat == "chan_min":
            return [self.reduce("ReduceMin", x, (0, 2, 3), out)]
        if stat == "img_max":
            return [self.reduce("ReduceMax", x, (2, 3), out)]
        if stat == "img_min":
            return [self.reduce("ReduceMin", x, (2, 3), out)]
        if stat in TOPK_STATS:
            return self.topk_nodes(x, out, largest=stat == "pos_top")
        if stat == RAW:
            return [helper.make_node("Identity", [x], [out], name=self.uid("Identity"))]
        raise ValueError(f"unknown statistic {stat!r}")


def instrument(
    model: Model,
    taps: Sequence[Tap],
    stats: Iterable[str] = CHANNEL_STATS,
    per_tap_stats: dict[str, Sequence[str]] | None = None,
    topk: int = 1,
) -> Instrumented:
    """Return a copy of the model with per-tap reductions as extra outputs.

    Args:
        model: the loaded model.
        taps: maps to measure.
        stats: statistics for every tap (see `ALL_STATS`).
        per_tap_stats: optional extra statistics for individual taps, by tap name.
        topk: k of the ``pos_top`` / ``pos_bottom`` statistics.

    Returns:
        The instrumented model and the map from each added output to (tap, statistic).
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    builder = _Builder(model.opset, topk)
    stats = tuple(stats)
    for s in stats:
        if s not in ALL_STATS:
            raise ValueError(f"unknown statistic {s!r}")

    added: dict[str, TapOutput] = {}
    inserts: dict[int, list[onnx.NodeProto]] = {}
    value_infos: list[onnx.ValueInfoProto] = []
    producer_of = {out: i for i, node in enumerate(graph.node) for out in node.output}
    for tap_index, tap in enumerate(taps):
        wanted = list(stats) + [s for s in (per_tap_stats or {}).get(tap.name, ()) if s not in stats]
        for stat in wanted:
            out = f"{_PREFIX}/{tap_index}/{stat}"
            nodes = builder.nodes_for(tap, stat, out)
            inserts.setdefault(producer_of[tap.name], []).extend(nodes)
            added[out] = TapOutput(tap.name, stat)
            value_infos.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))

    # Place each reduction right after the node producing its tap. ONNX Runtime schedules nodes by
    # a reverse DFS from the outputs that favours later node indices: appended reductions would all
    # run after the last conv and keep every tapped activation alive to the end (measured: twice
    # the peak memory on ResNet-50). Next to the producer, the activation can be freed early.
    new_nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        new_nodes.append(node)
        new_nodes.extend(inserts.get(i, []))
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(builder.initializers)
    graph.output.extend(value_infos)
    return Instrumented(proto=proto, outputs=added,
                        original_outputs=tuple(o.name for o in model.proto.graph.output))


def instrument_excess(model: Model, bounds: Mapping[str, tuple[np.ndarray, np.ndarray | None]]) -> Instrumented:
    """Add, per map, how often and how far each image leaves the given bounds (test-time signal).

    For each tap two outputs of shape [N]: ``excess_frac`` (fraction of the map's elements outside
    [lo, hi]) and ``excess_max`` (largest distance outside, in activation units). Computed in-graph,
    so suspect images never leave ORT as whole activations.

    Args:
        model: the loaded model.
        bounds: tap name -> (hi, lo) arrays broadcastable to [C, H, W]; lo may be None.
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    builder = _Builder(model.opset)
    producer_of = {out: i for i, node in enumerate(graph.node) for out in node.output}
    inserts: dict[int, list[onnx.NodeProto]] = {}
    added: dict[str, TapOutput] = {}
    value_infos = []
    for index, (tap, (hi, lo)) in enumerate(bounds.items()):
        hi_name = f"{_PREFIX}/excess/{index}/hi"
        builder.initializers.append(numpy_helper.from_array(np.asarray(hi, np.float32)[None], hi_name))
        over = builder.uid("over")
        nodes = [helper.make_node("Sub", [tap, hi_name], [over], name=builder.uid("Sub"))]
        if lo is not None:
            lo_name = f"{_PREFIX}/excess/{index}/lo"
            builder.initializers.append(numpy_helper.from_array(np.asarray(lo, np.float32)[None], lo_name))
            under, both = builder.uid("under"), builder.uid("both")
            nodes += [helper.make_node("Sub", [lo_name, tap], [under], name=builder.uid("Sub")),
                      helper.make_node("Max", [over, under], [both], name=builder.uid("Max"))]
            over = both
        pos, flag, flag_f = builder.uid("pos"), builder.uid("flag"), builder.uid("flag_f")
        frac, mx = f"{_PREFIX}/excess/{index}/frac", f"{_PREFIX}/excess/{index}/max"
        zero = f"{_PREFIX}/zero_f"
        if not any(i.name == zero for i in builder.initializers):
            builder.initializers.append(numpy_helper.from_array(np.array(0.0, np.float32), zero))
        nodes += [helper.make_node("Relu", [over], [pos], name=builder.uid("Relu")),
                  helper.make_node("Greater", [pos, zero], [flag], name=builder.uid("Greater")),
                  helper.make_node("Cast", [flag], [flag_f], to=TensorProto.FLOAT, name=builder.uid("Cast")),
                  builder.reduce("ReduceMean", flag_f, (1, 2, 3), frac),
                  builder.reduce("ReduceMax", pos, (1, 2, 3), mx)]
        inserts.setdefault(producer_of[tap], []).extend(nodes)
        for name, stat in ((frac, "excess_frac"), (mx, "excess_max")):
            added[name] = TapOutput(tap, stat)
            value_infos.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    new_nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        new_nodes.append(node)
        new_nodes.extend(inserts.get(i, []))
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(builder.initializers)
    graph.output.extend(value_infos)
    return Instrumented(proto=proto, outputs=added,
                        original_outputs=tuple(o.name for o in model.proto.graph.output))
