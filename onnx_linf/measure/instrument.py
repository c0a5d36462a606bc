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

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UsageError
from ..model.load import Model
from ..model.taps import Tap

#: Per-image, per-channel statistics: output shape [N, C].
CHANNEL_STATS = ("linf", "l1", "l2")

#: What a scan measures unless asked otherwise: ℓ∞ (the method's statistic) and ℓ1 (the norm the
#: paper contrasts it with; one cheap pass on a non-negative map). ℓ2 needs x*x written out in full
#: and read back, which no pooling op on ORT's blocked layout avoids: on ResNet-50 (batch 16, 49
#: maps) it is the costliest statistic by far (see benchmarks/README.md), so it is measured on request
#: or when it is the ranking score.
DEFAULT_STATS = ("linf", "l1")

#: Per-batch, per-position extremes over the batch axis: output shape [C, H, W].
POSITION_STATS = ("pos_max", "pos_min")

#: Per-batch per-channel extremes over batch and space: output shape [C].
BATCH_STATS = ("chan_max", "chan_min")

#: Per-batch k largest / smallest values over the batch axis at each position: [min(k, n), C, H, W].
#: Streaming quantiles of clamp bounds come from these (see `stats.TopK`).
TOPK_STATS = ("pos_top", "pos_bottom")

#: Per-image per-channel max / min over H, W (signed, no Abs), and mean over H, W of the map
#: (``img_mean``) and of its positive part (``img_pmean``, the channel-mean bound of a signed
#: map): output shape [N, C]. Streamed as top-k over images (see `stats.TopK`).
IMAGE_STATS = ("img_max", "img_min", "img_mean", "img_pmean")

#: The whole activation, for tests and debugging only: shape [N, C, H, W].
RAW = "raw"

#: Statistics the ``pool`` method computes with global pools on ORT's blocked layout.
POOLED_STATS = ("linf", "l1", "l2", "img_max", "chan_max")

ALL_STATS = CHANNEL_STATS + POSITION_STATS + BATCH_STATS + TOPK_STATS + IMAGE_STATS + (RAW,)

PREFIX = "onnx_linf"


@dataclass(frozen=True)
class TapOutput:
    """What one added graph output holds."""

    tap: str
    """Tensor name of the tap."""
    stat: str
    """One of `ALL_STATS`."""


@dataclass(frozen=True)
class Instrumented:
    """A model with reduction outputs added.

    It keeps the model's own proto (shared, not copied, and not modified) and only the part
    `instrument` adds, because a copy of the weights held for the session's whole life is as
    large as the model (+100 MB peak RSS on ResNet-50). `proto` builds the full model on demand;
    `serialize` gives ONNX Runtime its bytes without that copy.
    """

    outputs: dict[str, TapOutput]
    """Added graph output name -> (tap, statistic). Explicit, so nobody parses names."""
    original_outputs: tuple[str, ...]
    """Names of the model's own outputs (still present, first)."""
    base: onnx.ModelProto = field(repr=False)
    """The model's own proto."""
    added: onnx.ModelProto = field(repr=False)
    """Only the additions: a graph with the added nodes, initializers and outputs."""

    @property
    def proto(self) -> onnx.ModelProto:
        """The instrumented model: `base` with the added nodes, initializers and outputs appended."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.base)
        proto.MergeFrom(self.added)
        return proto

    def serialize(self) -> bytes:
        """Serialized `proto`, built without a second copy of the weights.

        Protobuf parsers merge a message field that occurs twice and append repeated fields, so
        the base model's bytes followed by the additions' bytes parse as exactly `proto`.
        """
        return self.base.SerializeToString() + self.added.SerializeToString()

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
        self._consts: set[str] = set()
        self._dynamic_hw: dict[str, str] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.counter = 0

    def uid(self, base: str) -> str:
        self.counter += 1
        return f"{PREFIX}/{self.counter}/{base}"

    def axes_input(self, axes: tuple[int, ...]) -> str:
        if axes not in self._axes:
            name = f"{PREFIX}/axes_{'_'.join(map(str, axes))}"
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
        """The k largest (smallest) values over the batch axis, [min(k, batch), C, H, W].

        k = 1 (the clamp's default, q = 100) is a ReduceMax/ReduceMin with keepdims, in every opset.
        Otherwise TopK with K = min(k, batch) computed in-graph (a last batch may be smaller than
        k): K became an input in opset 10 and `largest` an attribute in 11, so opset 10 takes the
        smallest values as -TopK(-x); older opsets cannot, and get a clear error.
        """
        if self.topk == 1:
            op = "ReduceMax" if largest else "ReduceMin"
            if self.opset >= 18:
                return [helper.make_node(op, [x, self.axes_input((0,))], [out], keepdims=1, name=self.uid(op))]
            return [helper.make_node(op, [x], [out], axes=[0], keepdims=1, name=self.uid(op))]
        if self.opset < 10:
            raise UsageError(f"quantiles below 100 need opset >= 10 (TopK with a K input); the model has "
                             f"opset {self.opset}", hint="use --quantile 100, or convert the model to a newer opset")
        k_name = f"{PREFIX}/topk_k"
        if not any(init.name == k_name for init in self.initializers):
            self.initializers.append(numpy_helper.from_array(np.array([self.topk], dtype=np.int64), k_name))
            self.initializers.append(numpy_helper.from_array(np.array([0], dtype=np.int64), f"{PREFIX}/zero1"))
            self.initializers.append(numpy_helper.from_array(np.array([1], dtype=np.int64), f"{PREFIX}/one1"))
        shape, n, k, idx = self.uid("shape"), self.uid("n"), self.uid("k"), self.uid("idx")
        smaller = self.uid("smaller")
        # Shape -> Slice keeps opsets 10..14 working (Shape's start/end attributes came in 15), and
        # Where(Less) rather than Min, which takes int64 only from opset 12 on.
        nodes = [
            helper.make_node("Shape", [x], [shape], name=self.uid("Shape")),
            helper.make_node("Slice", [shape, f"{PREFIX}/zero1", f"{PREFIX}/one1"], [n], name=self.uid("Slice")),
            helper.make_node("Less", [n, k_name], [smaller], name=self.uid("Less")),
            helper.make_node("Where", [smaller, n, k_name], [k], name=self.uid("Where")),
        ]
        if self.opset >= 11:
            return nodes + [helper.make_node("TopK", [x, k], [out, idx], axis=0, largest=int(largest), sorted=0,
                                             name=self.uid("TopK"))]
        if largest:
            return nodes + [helper.make_node("TopK", [x, k], [out, idx], axis=0, name=self.uid("TopK"))]
        neg, top = self.uid("neg"), self.uid("top")
        return nodes + [helper.make_node("Neg", [x], [neg], name=self.uid("Neg")),
                        helper.make_node("TopK", [neg, k], [top, idx], axis=0, name=self.uid("TopK")),
                        helper.make_node("Neg", [top], [out], name=self.uid("Neg"))]

    def const(self, name: str, value: np.ndarray) -> str:
        """A shared initializer (created once per name)."""
        full = f"{PREFIX}/{name}"
        if full not in self._consts:
            self.initializers.append(numpy_helper.from_array(value, full))
            self._consts.add(full)
        return full

    def node(self, op: str, inputs: list[str], base: str, out: str | None = None, **attrs) -> str:
        out = out or self.uid(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.uid(op), **attrs))
        return out

    def spatial_size(self, tap: Tap) -> str:
        """H*W of the tap as a float32 scalar: a constant when static, else computed from its shape."""
        if tap.static_spatial:
            h, w = tap.spatial
            return self.const(f"hw_{h}x{w}", np.array(float(h * w), dtype=np.float32))
        if tap.name in self._dynamic_hw:
            return self._dynamic_hw[tap.name]
        shape = self.node("Shape", [tap.name], "shape")
        hw = self.node("Slice", [shape, self.const("two1", np.array([2], np.int64)),
                                 self.const("four1", np.array([4], np.int64))], "hw")
        # ReduceProd without axes reduces everything, in every opset (no axes attribute/input needed).
        prod = self.node("ReduceProd", [hw], "hw_prod", keepdims=0)
        self._dynamic_hw[tap.name] = self.node("Cast", [prod], "hw_f", to=TensorProto.FLOAT)
        return self._dynamic_hw[tap.name]

    def spatial_mean(self, tap: Tap, t: str) -> tuple[str, str]:
        """Per-channel mean of `t` over H, W as [N, C, 1, 1], and the float32 factor that turns
        it into the sum.

        Maps of dynamic size get one GlobalAveragePool (the block size must be known).

        Why two levels: ORT's pools and Reduce* kernels add a channel's H*W values one after the
        other in float32, so the rounding error grows with H*W (measured: 4e-5 relative on a
        56x56 map of MobileNetV2, against 2e-7 for numpy's pairwise sum). An AveragePool over
        k x k blocks first (k a power of two, so its 1/k^2 is exact; zero padding counted, so
        sums are unchanged) cuts the longest run of additions from H*W to max(k^2, H*W/k^2) at
        the same cost: one read of the map, and a write k^2 times smaller.
        """
        if not tap.static_spatial:
            return self.node("GlobalAveragePool", [t], "gap"), self.spatial_size(tap)
        h, w = tap.spatial
        k = _block_size(h * w)
        if k == 1:
            return self.node("GlobalAveragePool", [t], "gap"), self.spatial_size(tap)
        ph, pw = -h % k, -w % k
        blocks = self.node("AveragePool", [t], "blocks", kernel_shape=[k, k], strides=[k, k],
                           pads=[0, 0, ph, pw], count_include_pad=1)
        factor = k * k * ((h + ph) // k) * ((w + pw) // k)
        return (self.node("GlobalAveragePool", [blocks], "gap"),
                self.const(f"sum_{factor}", np.array(float(factor), dtype=np.float32)))

    def pooled_nodes(self, tap: Tap, outs: Mapping[str, str]) -> list[onnx.NodeProto]:
        """ℓ∞/ℓ1/ℓ2 (and ``img_max``/``chan_max``) of one tap, computed with pooling ops.

        Why pools instead of ReduceMax/ReduceL1/ReduceL2: ORT keeps conv outputs in its blocked
        NCHWc layout. GlobalMaxPool, (Global)AveragePool, Relu, Mul(x, x) and depthwise Convs
        run on that layout directly, while a Reduce* (or Abs, Neg, Sub, Max) makes ORT reorder
        its whole input back to NCHW first: a full copy per tapped map before the first
        statistic. Here only the [N, C, 1, 1] results are reordered. The identities used are
        exact up to float rounding:

        * non-negative x (after Relu, ...): ℓ∞ = GMP(x), ℓ1 = sum(x);
        * signed x, ℓ∞ and ℓ1 without ℓ2: with q = max(-x, 0) (see below), ℓ∞ = max(GMP(x), GMP(q))
          and ℓ1 = sum(x) + 2*sum(q), since |x| = x + 2*max(-x, 0);
        * signed x otherwise: ℓ∞ = sqrt(GMP(x*x)) (x*x is shared with ℓ2; relative error ~1e-7
          for 1e-19 < |x| < 1e19) and ℓ1 = 2*sum(Relu(x)) - sum(x), since |x| = 2*Relu(x) - x;
        * any x: ℓ2 = sqrt(sum(x*x)).

        Sums come from `spatial_mean` (pairwise enough to stay within 1e-5 relative of numpy
        on float64, where ORT's sequential float32 sums are not).
        """
        self.nodes = []
        x = tap.name
        # Flatten keeps [N, C] whatever the batch size is (a Reshape to a constant shape would not).
        flat = lambda t, out=None: self.node("Flatten", [t], "flat", out, axis=1)  # noqa: E731
        want = set(outs)
        signed = not tap.non_negative
        # For a signed map, max(-x, 0) from a 1x1 depthwise Conv with weight -1 and a fused Relu
        # (exact, and run blocked like a Relu) serves ℓ∞ and ℓ1 in one pass. With ℓ2 requested
        # too, x*x (needed anyway) gives ℓ∞ and Relu(x) gives ℓ1: one pass fewer in total.
        neg = None
        if signed and {"linf", "l1"} <= want and "l2" not in want:
            c = tap.channels
            weight = self.const(f"neg_{c}", np.full((c, 1, 1, 1), -1.0, dtype=np.float32))
            neg = self.node("Relu", [self.node("Conv", [x, weight], "negx", group=c, kernel_shape=[1, 1])], "neg")
        sq = self.node("Mul", [x, x], "sq") if "l2" in want or ("linf" in want and signed and neg is None) else None
        gmp = self.node("GlobalMaxPool", [x], "gmp") if {"img_max", "chan_max"} & want or (
            "linf" in want and (not signed or neg is not None)) else None
        if "linf" in outs:
            if not signed:
                flat(gmp, outs["linf"])
            elif neg is not None:
                flat(self.node("Max", [gmp, self.node("GlobalMaxPool", [neg], "gmp_neg")], "gmp_abs"), outs["linf"])
            else:
                self.node("Sqrt", [flat(self.node("GlobalMaxPool", [sq], "gmp_sq"))], "linf", outs["linf"])
        if "img_max" in outs:
            flat(gmp, outs["img_max"])
        if "chan_max" in outs:
            self.nodes.append(self.reduce("ReduceMax", flat(gmp), (0,), outs["chan_max"]))
        if "l1" in outs:
            mean, scale = self.spatial_mean(tap, x)
            if neg is not None:
                # mean |x| = mean(x) + 2 * mean(max(-x, 0))
                m_neg, _ = self.spatial_mean(tap, neg)
                mean = self.node("Sum", [mean, m_neg, m_neg], "mean_abs")
            elif signed:
                # mean |x| = 2 * mean(relu(x)) - mean(x)
                pos, _ = self.spatial_mean(tap, self.node("Relu", [x], "pos"))
                mean = self.node("Sub", [self.node("Add", [pos, pos], "pos2"), mean], "mean_abs")
            self.node("Mul", [flat(mean), scale], "l1", outs["l1"])
        if "l2" in outs:
            mean, scale = self.spatial_mean(tap, sq)
            self.node("Sqrt", [self.node("Mul", [flat(mean), scale], "sumsq")], "l2", outs["l2"])
        nodes, self.nodes = self.nodes, []
        return nodes

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
        if stat in ("img_mean", "img_pmean"):
            # GlobalAveragePool, the op the channel-mean bound computes its means with: the same
            # kernel on the same map (runs on ORT's blocked layout; only [N, C, 1, 1] is reordered).
            self.nodes = []
            src = x if stat == "img_mean" or tap.non_negative else self.node("Relu", [x], "pos")
            self.node("Flatten", [self.node("GlobalAveragePool", [src], "gap")], "flat", out, axis=1)
            nodes, self.nodes = self.nodes, []
            return nodes
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
    *,
    method: str = "pool",
) -> Instrumented:
    """Return a copy of the model with per-tap reductions as extra outputs.

    Args:
        model: the loaded model.
        taps: maps to measure.
        stats: statistics for every tap (see `ALL_STATS`).
        per_tap_stats: optional extra statistics for individual taps, by tap name.
        topk: k of the ``pos_top`` / ``pos_bottom`` statistics.
        method: ``pool`` (default) computes ℓ∞/ℓ1/ℓ2, ``img_max`` and ``chan_max`` with global
            pools that run on ORT's blocked conv layout (see `_Builder.pooled_nodes`); ``reduce``
            uses ReduceMax/ReduceL1/ReduceL2 on the NCHW map (the straightforward form, kept as
            the reference the benchmark compares against). Both give the same values.

    Returns:
        The instrumented model and the map from each added output to (tap, statistic).
    """
    if method not in ("pool", "reduce"):
        raise ValueError(f"unknown method {method!r}: use pool or reduce")
    delta = onnx.ModelProto()
    builder = _Builder(model.opset, topk)
    stats = tuple(stats)
    for s in stats:
        if s not in ALL_STATS:
            raise ValueError(f"unknown statistic {s!r}")

    added: dict[str, TapOutput] = {}
    inserts: dict[int, list[onnx.NodeProto]] = {}
    value_infos: list[onnx.ValueInfoProto] = []
    producer_of = {out: i for i, node in enumerate(model.proto.graph.node) for out in node.output}
    for tap_index, tap in enumerate(taps):
        wanted = list(stats) + [s for s in (per_tap_stats or {}).get(tap.name, ()) if s not in stats]
        pooled = {s: f"{PREFIX}/{tap_index}/{s}" for s in wanted if s in POOLED_STATS} if method == "pool" else {}
        view, nodes = _float32_view(tap, f"{PREFIX}/{tap_index}/float32")
        if pooled:
            nodes += builder.pooled_nodes(view, pooled)
        for stat in wanted:
            out = f"{PREFIX}/{tap_index}/{stat}"
            if stat not in pooled:
                nodes.extend(builder.nodes_for(view, stat, out))
            added[out] = TapOutput(tap.name, stat)
            value_infos.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
        inserts.setdefault(producer_of[tap.name], []).extend(nodes)

    _append_by_tap(delta.graph, inserts)
    delta.graph.initializer.extend(builder.initializers)
    delta.graph.output.extend(value_infos)
    return Instrumented(outputs=added, original_outputs=tuple(o.name for o in model.proto.graph.output),
                        base=model.proto, added=delta)


def instrument_excess(model: Model, bounds: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
                      elem_types: Mapping[str, int] | None = None) -> Instrumented:
    """Add, per map, how often and how far each image leaves the given bounds (test-time signal).

    For each tap two outputs of shape [N]: ``excess_frac`` (fraction of the map's elements outside
    [lo, hi]) and ``excess_max`` (largest distance outside, in activation units). Computed in-graph,
    so suspect images never leave ORT as whole activations.

    Args:
        model: the loaded model.
        bounds: tap name -> (hi, lo) arrays broadcastable to [C, H, W]; lo may be None.
        elem_types: ONNX element type per tap name when not float32 (`Tap.elem_type`).
    """
    delta = onnx.ModelProto()
    builder = _Builder(model.opset)
    producer_of = {out: i for i, node in enumerate(model.proto.graph.node) for out in node.output}
    inserts: dict[int, list[onnx.NodeProto]] = {}
    added: dict[str, TapOutput] = {}
    value_infos = []
    for index, (tap, (hi, lo)) in enumerate(bounds.items()):
        hi_name = f"{PREFIX}/excess/{index}/hi"
        builder.initializers.append(numpy_helper.from_array(np.asarray(hi, np.float32)[None], hi_name))
        over = builder.uid("over")
        elem_type = (elem_types or {}).get(tap, TensorProto.FLOAT)
        tap_in, nodes = _as_float32(tap, elem_type, f"{PREFIX}/excess/{index}/float32")
        nodes.append(helper.make_node("Sub", [tap_in, hi_name], [over], name=builder.uid("Sub")))
        if lo is not None:
            lo_name = f"{PREFIX}/excess/{index}/lo"
            builder.initializers.append(numpy_helper.from_array(np.asarray(lo, np.float32)[None], lo_name))
            under, both = builder.uid("under"), builder.uid("both")
            nodes += [helper.make_node("Sub", [lo_name, tap_in], [under], name=builder.uid("Sub")),
                      helper.make_node("Max", [over, under], [both], name=builder.uid("Max"))]
            over = both
        pos, flag, flag_f = builder.uid("pos"), builder.uid("flag"), builder.uid("flag_f")
        frac, mx = f"{PREFIX}/excess/{index}/frac", f"{PREFIX}/excess/{index}/max"
        zero = f"{PREFIX}/zero_f"
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
    _append_by_tap(delta.graph, inserts)
    delta.graph.initializer.extend(builder.initializers)
    delta.graph.output.extend(value_infos)
    return Instrumented(outputs=added, original_outputs=tuple(o.name for o in model.proto.graph.output),
                        base=model.proto, added=delta)


def _as_float32(tensor: str, elem_type: int, name: str) -> tuple[str, list[onnx.NodeProto]]:
    """`tensor` itself when it is float32; else `name`, the output of a Cast to float32, and that node.

    Statistics are float32 whatever the model computes in: a float16 map's maximum converts
    exactly, and its sums are then taken in float32, as for any other map (within the same 1e-5
    of float64 numpy; a float16 sum would be ~1e-3 off). The cast is one more pass over the map.
    """
    if elem_type == TensorProto.FLOAT:
        return tensor, []
    return name, [helper.make_node("Cast", [tensor], [name], to=TensorProto.FLOAT, name=f"{name}/Cast")]


def _float32_view(tap: Tap, name: str) -> tuple[Tap, list[onnx.NodeProto]]:
    """The tap, or a tap standing for its float32 cast (see `_as_float32`), and the nodes that make it."""
    source, nodes = _as_float32(tap.name, tap.elem_type, name)
    if not nodes:
        return tap, nodes
    return dataclasses.replace(tap, name=source, elem_type=TensorProto.FLOAT), nodes


def _block_size(area: int) -> int:
    """Side k of the blocks `spatial_mean` pre-sums (1: none): about area**(1/4), a power of two."""
    if area <= 256:
        return 1
    return min(32, max(4, 2 ** round(np.log2(area) / 4)))


def _append_by_tap(graph: onnx.GraphProto, inserts: Mapping[int, Sequence[onnx.NodeProto]]) -> None:
    """Append the added nodes (after the model's own, see `Instrumented`), the last tap's first.

    Why this order: ONNX Runtime's default execution order is a reverse DFS from the graph's leaf
    nodes (those without consumers), starting from the *highest node index*. If the model's own
    output node has the highest index, the DFS emits the whole backbone first and every reduction
    only after the last conv, so every tapped map stays alive to the end of the run. With the
    reductions last and the first tap's highest, the DFS starts at the first tap's reductions,
    then the second tap's (emitting only the layers between), and so on: each map's reductions
    run right after its producer and the map is freed as in plain inference. Inserting the nodes
    next to their producers in the file does not do this (the model's output node still has the
    highest index); the ORT profiler shows the order (see ``tests/test_perf_paths.py``).
    """
    for producer in sorted(inserts, reverse=True):
        graph.node.extend(inserts[producer])
