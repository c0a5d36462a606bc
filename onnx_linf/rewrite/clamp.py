"""The ℓ∞ clamp: ``Min(a, hi)`` (and ``Max(., lo)``) right after each map, per channel or per position."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import RewriteError
from ..model.load import Model
from .graph import PREFIX, GraphFacts, Names, check_rewritable, export_graph, import_graph, np_dtype, splice_after

log = logging.getLogger(__name__)


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
    facts = GraphFacts(source)
    names = Names(source)
    graph = import_graph(source)
    tensors = graph.tensors()
    renamed: dict[str, str] = {}
    records: list[ClampRecord] = []
    for tap, bound in bounds.items():
        if tap not in facts.producer:
            raise RewriteError(f"unknown tap '{tap}': no node of the main graph produces it")
        dtype = np_dtype(tap, facts)
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
            hi_c = gs.Constant(names.fresh(f"{PREFIX}/clamp_hi/{tap}"), hi)
            if lo is None:
                return [gs.Node("Min", names.fresh(f"{PREFIX}/clamp/{tap}/Min"), inputs=[raw, hi_c], outputs=[out])]
            mid = gs.Variable(names.fresh(f"{PREFIX}/clamp/{tap}/below_hi"), dtype=out.dtype, shape=out.shape)
            lo_c = gs.Constant(names.fresh(f"{PREFIX}/clamp_lo/{tap}"), lo)
            return [gs.Node("Min", names.fresh(f"{PREFIX}/clamp/{tap}/Min"), inputs=[raw, hi_c], outputs=[mid]),
                    gs.Node("Max", names.fresh(f"{PREFIX}/clamp/{tap}/Max"), inputs=[mid, lo_c], outputs=[out])]

        renamed[splice_after(graph, tensors[tap], names, build)] = tap
        records.append(ClampRecord(tap, granularity, lo is not None, int(hi.size)))
        log.info("clamped %s per %s (%s)", tap, granularity, "two-sided" if lo is not None else "upper")
    return export_graph(graph, source, renamed), records
