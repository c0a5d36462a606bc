"""The ℓ∞ clamp and the channel-mean bound, inserted right after each map.

Per map ``a`` ``[N, C, H, W]`` (each part optional):

* channel-mean bound: ``mu = GlobalAveragePool(a)`` (``Relu`` first for a signed map),
  ``s = Min(Max(B, eps) / Max(mu, eps), 1)``, ``a' = a * s^p``: an image whose channel mean exceeds
  what clean images produce (``B``, per channel) gets that channel scaled down, by more than the
  excess ratio for ``p > 1``. Where ``mu <= B`` the factor is exactly 1 and ``a * 1 == a``;
* position clamp: ``Min(a', hi)`` and ``Max(., lo)`` with per-position or per-channel bounds; with
  ``excess="fold"`` a value above ``hi`` is reflected at it instead, ``Min(a', 2 hi - a')``, and
  floored (at ``lo``, or at 0 for a one-sided bound, which the commands build only for non-negative
  maps): the further a value went beyond anything clean images produce, the less of it is kept,
  where the plain clamp keeps it at the clean maximum. Values at or below ``hi`` are untouched
  either way (``2 hi - a >= a`` in float arithmetic too, rounding being monotone);
* optionally a per-image anomaly score, the graph output ``onnx_linf_score``: the largest of the
  score *parts*, each divided by its scale. A map has up to three parts: the largest ``log(mu / B)``
  over its channels (the channel-mean part, which sees full-image triggers that raise activity;
  graded against a reference ``R`` below ``B`` when given), with a low reference ``L`` the largest
  ``log(L / mu)`` (the low part: triggers that lower activity, as a blend does by scaling the image
  by ``1 - alpha``), and its largest position excess relative to its channel's largest bound (the
  position part, which sees patches), each clipped at 0. Measured, the kinds complement each other:
  the mean parts alone were blind to a patch trigger (AUROC 0.50), the position parts weak on
  blended ones (0.79). The
  scales (1 by default) let a caller put every part on the same footing, e.g. its held-out clean
  99th percentile (what ``clamp`` does): a part whose clean values are naturally large then no
  longer drowns the evidence of a quiet one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import RewriteError
from ..model.load import Model
from .exclude import exclude_when_gated
from .graph import (
    PREFIX,
    GraphFacts,
    Names,
    Nodes,
    check_rewritable,
    export_graph,
    import_graph,
    np_dtype,
    splice_after,
)
from .score import SCORE_OUTPUT, SCORE_PARTS_OUTPUT, score_outputs

log = logging.getLogger(__name__)


#: Name of the bool ``[N]`` output ``clamp_maps(gate_output=True)`` adds: the images the score gate
#: flagged (at any map: the evidence only grows from map to map).
GATED_OUTPUT = "onnx_linf_gated"
#: Kinds of score part the score gate reads, each summed over the maps on its own: the channel-mean
#: evidence, above and below (a patch, which only the position parts see, is the position clamp's job).
GATE_PARTS = ("mean", "low")
#: What happens to a value above its position bound: ``clip`` (kept at the bound, the ℓ∞ clamp) or
#: ``fold`` (reflected at the bound, ``2 hi - a``, and floored).
EXCESS_KINDS = ("clip", "fold")
#: What the score can read on images inside every bound: 0 up to float rounding, because ORT may
#: fuse the rewritten graph differently from the one the bounds were measured with (a map then
#: comes out an ulp or so above the maximum it was measured at: relative excess ~1e-7).
SCORE_FLOOR = 1e-5


@dataclass(frozen=True, eq=False)
class MeanBound:
    """Channel-mean bound of one map. ``eq=False``: numpy arrays have no single truth value for ``==``."""

    hi: np.ndarray
    """``[C]`` largest clean per-image spatial mean of each channel (of ``Relu(a)`` when `positive`)."""
    power: float = 2.0
    """Exponent p of the scale factor ``min(B / mu, 1)^p``: p = 1 leaves the channel mean at the bound."""
    eps: float = 1e-6
    """Floor of both mean and bound (activation units): channels that are dead on clean images are
    never divided by zero, and means below it are never scaled."""
    positive: bool = False
    """Bound the mean of ``Relu(a)`` (for maps that can go negative) instead of the mean of ``a``."""
    gate_hi: np.ndarray | None = None
    """``[C]`` tighter bound for images the score gate has flagged (``clamp_maps(gate_threshold=)``):
    they get ``min(B_gate / mu, 1)^p`` instead; equal to `hi`: the gate only flags here (what
    ``clamp --gate-response exclude`` builds); None: the gate does not act on this map."""
    ref: np.ndarray | None = None
    """``[C]`` reference of the map's mean score part, ``max_c relu(log(max(mu, eps) / max(R, eps)))``,
    when it differs from `hi`: the evidence can be graded against a fixed clean quantile whatever
    strength the bound itself has. None: `hi` (the part is then ``-log`` of the smallest factor)."""
    lo: np.ndarray | None = None
    """``[C]`` smallest clean per-image spatial mean of each channel: the reference of the map's
    *low* score part ``max_c relu(log(max(L, eps) / max(mu, eps)))``, which sees triggers that lower
    activity (a blend also scales the image by ``1 - alpha``). Evidence only: nothing is scaled up
    (measured: raising a flagged image's low channels back to a clean level raised the ASR it was
    meant to cut). None: no low part."""


@dataclass(frozen=True, eq=False)
class ClampBound:
    """Bounds for one tap. ``eq=False``: numpy arrays have no single truth value for ``==``."""

    hi: np.ndarray | None
    """Upper bound, float32, shape ``[C,1,1]`` (per channel) or ``[C,H,W]`` (per position); None: no
    position clamp (a channel-mean bound only)."""
    lo: np.ndarray | None = None
    """Optional lower bound with the same shape as `hi` (``lo <= hi`` everywhere)."""
    mean: MeanBound | None = None
    """Optional channel-mean bound, applied before the position clamp."""


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
    """Number of bound values per side (``C`` or ``C*H*W``; 0 without a position clamp)."""
    mean_bound: bool = False
    """True when a channel-mean bound was applied."""
    score_parts: tuple[str, ...] = ()
    """Kinds (``mean``, ``low``, ``position``) of this map's score parts, in output order (empty without a score)."""


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


@dataclass(frozen=True)
class _GateAt:
    """The score gate at one map: thresholds, this map's part scales, the evidence of earlier maps."""

    threshold: float
    low_threshold: float | None
    """None: the low parts are not read by the gate."""
    scale: float
    low_scale: float | None
    before: gs.Variable | None
    low_before: gs.Variable | None


def _per_channel(value: np.ndarray, channels: int, what: str) -> np.ndarray:
    """`value` as float64 ``[C]``; RewriteError unless it is `channels` finite values >= 0."""
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.shape != (channels,) or not np.isfinite(arr).all() or (arr < 0).any():
        raise RewriteError(f"{what} must be {channels} finite values >= 0")
    return arr


def _mean_bound_nodes(n: Nodes, raw: gs.Variable, mb: MeanBound, channels: int, score: bool,
                      out: gs.Variable | None = None, gate: _GateAt | None = None,
                      ) -> tuple[gs.Variable, list[gs.Variable], tuple[gs.Variable | None, ...]]:
    """``raw * min(max(B, eps) / max(mu, eps), 1)^p``; when asked, the per-image parts
    (``[N, 1, 1, 1]``): ``max_c relu(log(mu / B))`` and, with `MeanBound.lo`, the low part; with
    `gate`, the gate's running evidence (above, below) and its flag.

    The gate's evidence on each side is the sum of that side's scaled parts (part / scale) over
    this and the earlier maps; an image is flagged here when either sum is above its threshold, and
    a flagged image's bound is `MeanBound.gate_hi`. ``Where`` picks ``B`` for the others, whose
    factor is then computed from the same values: bit for bit unchanged.
    """
    hi = _per_channel(mb.hi, channels, f"channel-mean bound of '{n.tap}'")
    if not (mb.eps > 0 and mb.power > 0):
        raise RewriteError(f"channel-mean bound of '{n.tap}': eps and power must be > 0")
    gated = gate is not None and mb.gate_hi is not None
    source = n("Relu", [raw], "positive") if mb.positive else raw
    mu = n("GlobalAveragePool", [source], "mean")
    # With B' = max(B, eps): B' / max(mu, B') is min(B' / max(mu, eps), 1) bit for bit (a mean
    # at or below B' divides B' by itself, exactly 1; above it max(mu, eps) is mu), in two nodes.
    num = n.const("mean_hi", np.maximum(hi, mb.eps).reshape(1, channels, 1, 1))
    factor = n("Div", [num, n("Max", [mu, num], "mean_floor")], "mean_factor")
    parts: list[gs.Variable] = []
    evidence = low_evidence = mean_part = low_part = flag = None
    if score or gated:
        if mb.ref is None:
            # max_c relu(log(max(mu, eps) / max(B, eps))) = -log(min_c factor): every factor is <= 1.
            smallest = n.reduce(factor, "ReduceMin", [1, 2, 3], "mean_factor_min", keepdims=1)
            mean_part = n("Neg", [n("Log", [smallest], "log_factor_min")], "mean_score")
        else:
            ref = _per_channel(mb.ref, channels, f"channel-mean score reference of '{n.tap}'")
            ref_c = n.const("mean_ref", np.maximum(ref, mb.eps).reshape(1, channels, 1, 1))
            over = n("Div", [n("Max", [mu, ref_c], "ref_floor"), ref_c], "ref_ratio")  # max(mu/R, 1)
            largest_over = n.reduce(over, "ReduceMax", [1, 2, 3], "ref_ratio_max", keepdims=1)
            mean_part = n("Log", [largest_over], "mean_score")
        if mb.lo is not None:
            lo = _per_channel(mb.lo, channels, f"channel-mean low reference of '{n.tap}'")
            # A channel whose clean minimum is at or below eps gives max(L, eps) / max(mu, eps) <= 1:
            # no evidence, however low its mean goes.
            low_c = n.const("mean_lo", np.maximum(lo, mb.eps).reshape(1, channels, 1, 1))
            ratio = n("Div", [low_c, n("Max", [mu, n.const("mean_eps", mb.eps)], "low_floor")], "low_ratio")
            largest = n.reduce(ratio, "ReduceMax", [1, 2, 3], "low_ratio_max", keepdims=1)
            low_part = n("Relu", [n("Log", [largest], "log_low_ratio")], "low_score")
    if score:
        parts.append(mean_part)
        if low_part is not None:
            parts.append(low_part)
    if gated:
        g_hi = _per_channel(mb.gate_hi, channels, f"gate bound of '{n.tap}'")
        evidence = n("Mul", [mean_part, n.const("gate_scale", 1.0 / gate.scale)], "gate_part")
        if gate.before is not None:
            evidence = n("Add", [gate.before, evidence], "gate_evidence")
        flag = n("Greater", [evidence, n.const("gate_threshold", gate.threshold)], "gate_hit", dtype=np.bool_)
        if low_part is not None and gate.low_threshold is not None:
            low_evidence = n("Mul", [low_part, n.const("gate_low_scale", 1.0 / gate.low_scale)], "gate_low_part")
            if gate.low_before is not None:
                low_evidence = n("Add", [gate.low_before, low_evidence], "gate_low_evidence")
            low_flag = n("Greater", [low_evidence, n.const("gate_low_threshold", gate.low_threshold)],
                         "gate_low_hit", dtype=np.bool_)
            flag = n("Or", [flag, low_flag], "gate_either", dtype=np.bool_)
        tighter = np.maximum(np.minimum(g_hi, hi), mb.eps)
        if not np.array_equal(tighter, np.maximum(hi, mb.eps)):  # a gate bound equal to B only flags
            g_num = n.const("gate_hi", tighter.reshape(1, channels, 1, 1))
            bound = n("Where", [flag, g_num, num], "gated_bound")
            factor = n("Div", [bound, n("Max", [mu, bound], "gated_floor")], "gated_factor")
    scaled = n("Mul", [raw, _power(n, factor, float(mb.power))], "mean_scaled", out=out)
    return scaled, parts, (evidence, low_evidence, flag)


#: Integer powers up to this are products (repeated squaring), higher or fractional ones `Pow`.
MAX_INT_POWER = 64


def _power(n: Nodes, x: gs.Variable, p: float) -> gs.Variable:
    """``x^p``: by repeated squaring for an integer p (p = 6: three Muls), else one ``Pow``.

    ORT's Pow calls ``std::pow`` per element: 0.65 ms for a [16, 960] factor against 0.05 ms for
    the three Muls (measured, benchmarks/README.md). Where the factor is 1 both give exactly 1;
    below 1 the products differ from ``pow`` by a few float32 ulps.
    """
    if p != int(p) or not 1 <= p <= MAX_INT_POWER:
        return n("Pow", [x, n.const("mean_power", p)], "mean_scale")
    k, result, base = int(p), None, x
    while k:
        if k & 1:
            result = base if result is None else n("Mul", [result, base], "mean_scale")
        k >>= 1
        if k:
            base = n("Mul", [base, base], "mean_square")
    return result


def _position_score(n: Nodes, x: gs.Variable, hi: np.ndarray, lo: np.ndarray | None,
                    hi_c: gs.Constant, lo_c: gs.Constant | None) -> gs.Variable:
    """Per image, the largest excess over [lo, hi], relative to the channel's largest |bound|: 0 inside."""
    excess = n("Relu", [n("Sub", [x, hi_c], "above")], "above_pos")
    if lo_c is not None:
        excess = n("Max", [excess, n("Relu", [n("Sub", [lo_c, x], "below")], "below_pos")], "outside")
    size = np.abs(hi).reshape(hi.shape[0], -1).max(axis=1)
    if lo is not None:
        size = np.maximum(size, np.abs(lo).reshape(lo.shape[0], -1).max(axis=1))
    inv = (1.0 / np.maximum(size, 1e-3)).reshape(1, -1, 1, 1)
    return n.reduce_max(n("Mul", [excess, n.const("inv_scale", inv)], "excess_rel"), [1, 2, 3], "pos_score")


def clamp_maps(model: Model, bounds: Mapping[str, ClampBound], *, score_output: bool = False,
               score_parts: bool = False, score_scales: Sequence[float] | None = None,
               gate_threshold: float | None = None, gate_low_threshold: float | None = None,
               excess: str = "clip", gate_output: bool = False, gate_exclude: Sequence[int] = (),
               exclude_from: str | None = None,
               ) -> tuple[onnx.ModelProto, list[ClampRecord]]:
    """Insert the channel-mean bound and ``Min(a, hi)`` (``Max(., lo)`` too) right after each tap.

    The bounded tensor keeps the tap's name, so every consumer of the tap, and a graph output
    named after it, reads the bounded value. ``Min`` returns one of its operands unchanged and a
    channel whose mean is within its bound is multiplied by exactly 1, so on data that stays
    within every bound (e.g. bounds = the maxima over that data) the outputs are bit-for-bit
    unchanged (up to how ORT fuses around the new nodes, see `verify`).

    Args:
        model: the loaded model (its proto is not modified).
        bounds: tap tensor name -> bounds: position/channel bounds float32 ``[C,1,1]`` or
            ``[C,H,W]``, and an optional `MeanBound`.
        score_output: also add the graph output `SCORE_OUTPUT`, float32 ``[N]``: per image the
            largest score part (per map the largest ``log(mu / B)``, with `MeanBound.lo` the largest
            ``log(L / mu)``, and the largest relative position excess, clipped at 0) divided by its
            scale, computed from the same nodes in the same forward pass.
        score_parts: also add `SCORE_PARTS_OUTPUT`, float32 ``[N, P]``, the unscaled parts (with
            `score_output`; what a caller measures the scales from).
        score_scales: one positive scale per part (`ClampRecord.score_parts` order); None: all 1.
        gate_threshold: the score gate: at each map with a `MeanBound.gate_hi`, images whose
            running evidence (the sum of the scaled channel-mean parts, mean and low, of the maps so
            far, this map's included) exceeds it get the gate's tighter channel-mean factor. Images below it are
            untouched, so the score of every image the gate leaves alone is what it was without it.
        gate_low_threshold: with `gate_threshold`, the gate also flags images whose sum of scaled
            low parts (maps with `MeanBound.lo`) so far exceeds this; None: the low parts only score.
        gate_output: also add `GATED_OUTPUT` (needs the gate), which images it flagged: what a
            caller verifying the rewrite must leave out of an identity check.
        gate_exclude: classes an image the gate flagged must not be given (suspected targets): its
            scores of them in `exclude_from` (default: the first graph output, ``[N, K]``) become its
            smallest score (`rewrite.exclude`); images the gate leaves alone come out bit for bit.
        excess: `EXCESS_KINDS`: ``clip`` keeps a value above ``hi`` at ``hi``; ``fold`` reflects it,
            ``2 hi - a``, floored at ``lo`` or, for a one-sided bound, at 0 (a one-sided bound is
            then a statement that the map is non-negative, as it is for every one-sided bound the
            commands build). The lower bound clips either way.

    Returns:
        The rewritten model and one `ClampRecord` per tap, in the order of `bounds`.

    Raises:
        RewriteError: unknown tensor, bound of the wrong shape or with NaN, ``lo > hi`` somewhere,
            a bad channel-mean bound, or an opset older than 8 (no broadcasting Min/Max).
    """
    check_rewritable(model)
    if excess not in EXCESS_KINDS:
        raise RewriteError(f"excess must be one of {', '.join(EXCESS_KINDS)}, got {excess!r}")
    if model.opset and model.opset < 8:
        raise RewriteError(f"clamping needs opset >= 8 (broadcasting Min/Max); the model has opset {model.opset}")
    source = model.proto
    facts = GraphFacts(source)
    names = Names(source)
    graph = import_graph(source)
    tensors = graph.tensors()
    renamed: dict[str, str] = {}
    records: list[ClampRecord] = []
    scores: list[gs.Variable] = []
    kinds: dict[str, tuple[str, ...]] = {}
    if score_parts and not score_output:
        raise RewriteError("score parts need the score output")
    for value in (gate_threshold, gate_low_threshold):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise RewriteError(f"the gate threshold must be finite and >= 0, got {value}")
    if gate_low_threshold is not None and gate_threshold is None:
        raise RewriteError("a low gate threshold needs the gate threshold")
    # Parts are counted with the gate too: its per-map limits use the parts' scales.
    with_parts = score_output or gate_threshold is not None
    scales = None if score_scales is None else np.asarray(score_scales, dtype=np.float64).reshape(-1)
    evidence: list[gs.Variable] = []  # the gate's running evidence, float [N, 1, 1, 1]
    low_evidence: list[gs.Variable] = []  # the same for the low parts
    flags: list[gs.Variable] = []  # the gate's flag at each gated map, bool [N, 1, 1, 1]

    counted = [0]  # parts so far, built or not (the gate alone builds no position parts)

    def add_part(n: Nodes, part: gs.Variable | None, dtype: np.dtype) -> None:
        counted[0] += 1
        if part is not None and score_output:
            scores.append(part if dtype == np.float32 else n("Cast", [part], "score_f32", dtype=np.float32,
                                                             to=onnx.TensorProto.FLOAT))

    def gate_of(j: int, low: bool) -> _GateAt:
        """The gate at a map whose channel-mean part is part `j` (its low part `j + 1` when `low`).
        Only channel-mean parts gate: a patch, which only the position parts see, is the position
        clamp's job (gating it let a patch backdoor back)."""
        if scales is not None and j + low >= len(scales):
            raise RewriteError(f"the score needs a scale for every part, got {len(scales)}")
        taken = (1.0, 1.0) if scales is None else (float(scales[j]), float(scales[j + low]))
        reads_low = low and gate_low_threshold is not None
        return _GateAt(float(gate_threshold), float(gate_low_threshold) if reads_low else None, taken[0],
                       taken[1] if reads_low else None, evidence[-1] if evidence else None,
                       low_evidence[-1] if low_evidence else None)
    for taken in (SCORE_OUTPUT, SCORE_PARTS_OUTPUT) if score_output else ():
        if taken in names.taken:
            raise RewriteError(f"the model already has a tensor named '{taken}'")
    for tap, bound in bounds.items():
        if tap not in facts.producer:
            raise RewriteError(f"unknown tap '{tap}': no node of the main graph produces it")
        dtype = np_dtype(tap, facts)
        shape = facts.shapes.get(tap)
        hi = lo = None
        granularity = "none"
        if bound.hi is not None:
            hi, granularity = _bound_array(tap, "hi", bound.hi, dtype, shape)
        if bound.lo is not None:
            if hi is None:
                raise RewriteError(f"clamp bounds of '{tap}': a lower bound needs an upper bound")
            lo, _ = _bound_array(tap, "lo", bound.lo, dtype, shape)
            if lo.shape != hi.shape:
                raise RewriteError(f"clamp bounds of '{tap}' differ in shape: lo {list(lo.shape)}, hi {list(hi.shape)}")
            if (lo > hi).any():
                raise RewriteError(f"clamp bounds of '{tap}' have lo > hi at {int((lo > hi).sum())} element(s)")
        if hi is None and bound.mean is None:
            raise RewriteError(f"clamp bounds of '{tap}': nothing to apply")
        channels = shape[1] if shape is not None and len(shape) == 4 and shape[1] is not None else (
            None if hi is None else hi.shape[0])
        if bound.mean is not None and channels is None:
            raise RewriteError(f"channel-mean bound of '{tap}': the map's channel count is unknown")

        def build(raw: gs.Variable, out: gs.Variable, tap: str = tap, hi: np.ndarray | None = hi,
                  lo: np.ndarray | None = lo, mean: MeanBound | None = bound.mean, dtype: np.dtype = dtype,
                  channels: int | None = channels) -> list[gs.Node]:
            n = Nodes(names, model.opset or 21, tap, dtype)
            x, parts = raw, []  # kinds of this map's score parts
            if mean is not None:
                kinds_here = ("mean", "low") if mean.lo is not None else ("mean",)
                gate = (gate_of(counted[0], mean.lo is not None)
                        if gate_threshold is not None and mean.gate_hi is not None else None)
                # Without a position clamp the scaling Mul writes the tap's own tensor.
                x, mean_parts, (so_far, low_so_far, flag) = _mean_bound_nodes(
                    n, raw, mean, channels, score_output, out=out if hi is None else None, gate=gate)
                if flag is not None:
                    flags.append(flag)
                if so_far is not None:
                    evidence.append(so_far)
                if low_so_far is not None:
                    low_evidence.append(low_so_far)
                if with_parts:
                    for i, kind in enumerate(kinds_here):
                        parts.append(kind)
                        add_part(n, mean_parts[i] if mean_parts else None, dtype)
            if hi is not None:
                hi_c = n.const("clamp_hi", hi)
                lo_c = None if lo is None else n.const("clamp_lo", lo)
                if with_parts:  # the position part is built only for the score output (full-size nodes)
                    parts.append("position")
                    add_part(n, _position_score(n, x, hi, lo, hi_c, lo_c) if score_output else None, dtype)
                top = hi_c
                if excess == "fold":
                    with np.errstate(over="ignore"):  # 2 hi is exact in the map's dtype, or inf: no bound
                        twice = hi * hi.dtype.type(2)
                    top = n("Sub", [n.const("clamp_fold", twice), x], "fold")
                # The floor: lo, or 0 for a folded one-sided (non-negative) map; a clip needs none.
                floored = lo is not None or excess == "fold"
                below = n("Min", [x, top], "below_hi", out=None if floored else out)
                if lo is not None:
                    n("Max", [below, lo_c], "max", out=out)
                elif floored:
                    n("Relu", [below], "floor", out=out)
            kinds[tap] = tuple(parts)
            return n.nodes

        renamed[splice_after(graph, tensors[tap], names, build)] = tap
        records.append(ClampRecord(tap, granularity, lo is not None, 0 if hi is None else int(hi.size),
                                   bound.mean is not None, kinds.get(tap, ())))
        log.info("clamped %s (%s%s%s)", tap, granularity, ", two-sided" if lo is not None else "",
                 ", channel means" if bound.mean is not None else "")
    extra: tuple[str, ...] = ()
    if score_output:
        graph.outputs.extend(score_outputs(graph, names, model.opset or 21, scores, score_scales, score_parts))
        extra = (SCORE_OUTPUT, SCORE_PARTS_OUTPUT) if score_parts else (SCORE_OUTPUT,)
    if gate_output:
        if not flags:
            raise RewriteError("the gate output needs the score gate on at least one map")
        if GATED_OUTPUT in names.taken:
            raise RewriteError(f"the model already has a tensor named '{GATED_OUTPUT}'")
        gated = gs.Variable(GATED_OUTPUT, dtype=np.bool_, shape=["N"])
        shape = gs.Constant(names.fresh(f"{PREFIX}/gated/shape"), np.array([-1], dtype=np.int64))
        graph.nodes.append(gs.Node("Reshape", names.fresh(f"{PREFIX}/gated/Reshape"), inputs=[flags[-1], shape],
                                   outputs=[gated]))
        graph.outputs.append(gated)
        extra += (GATED_OUTPUT,)
    if gate_exclude:
        if not flags:
            raise RewriteError("excluding classes from gated images needs the score gate on at least one map")
        target = exclude_from or source.graph.output[0].name
        renamed[exclude_when_gated(graph, tensors, facts, names, model.opset or 21, flags[-1], target,
                                   gate_exclude)] = target
        graph.toposort()
    return export_graph(graph, source, renamed, extra_outputs=extra), records
