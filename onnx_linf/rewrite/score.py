"""The per-image anomaly score outputs of a clamped model (`rewrite.clamp`, ``score_output``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import RewriteError
from .graph import PREFIX, Names

#: Name of the per-image anomaly score output that ``clamp_maps(score_output=True)`` adds.
SCORE_OUTPUT = "onnx_linf_score"
#: Name of the ``[N, P]`` output of the unscaled score parts (``clamp_maps(score_parts=True)``), in
#: the order of `ClampRecord.score_parts` over the records.
SCORE_PARTS_OUTPUT = "onnx_linf_score_parts"


def score_outputs(graph: gs.Graph, names: Names, opset: int, parts: list[gs.Variable],
                   scales: Sequence[float] | None, parts_output: bool) -> list[gs.Variable]:
    """``max_k(part_k / scale_k)`` as the float32 ``[N]`` output `SCORE_OUTPUT` (and the ``[N, P]`` parts)."""
    if not parts:
        raise RewriteError("the score output needs at least one bounded map")
    if scales is not None:
        scales = np.asarray(scales, dtype=np.float64).reshape(-1)
        if len(scales) != len(parts) or not (np.isfinite(scales).all() and (scales > 0).all()):
            raise RewriteError(f"the score needs {len(parts)} finite positive part scales, got {len(scales)}")

    def node(op: str, inputs: list, out: gs.Variable | None = None, **attrs) -> gs.Variable:
        out = out or gs.Variable(names.fresh(f"{PREFIX}/score/{op}"), dtype=np.float32)
        graph.nodes.append(gs.Node(op, names.fresh(f"{PREFIX}/score/{op}"), attrs=attrs, inputs=inputs, outputs=[out]))
        return out

    column = gs.Constant(names.fresh(f"{PREFIX}/score/column"), np.array([-1, 1], dtype=np.int64))
    stacked_out = gs.Variable(SCORE_PARTS_OUTPUT, dtype=np.float32, shape=["N", len(parts)]) if parts_output else None
    stacked = node("Concat", [node("Reshape", [p, column]) for p in parts], stacked_out, axis=1)
    if scales is not None and not (scales == 1.0).all():
        inv = gs.Constant(names.fresh(f"{PREFIX}/score/inv_scale"), (1.0 / scales).astype(np.float32).reshape(1, -1))
        stacked = node("Mul", [stacked, inv])
    out = gs.Variable(SCORE_OUTPUT, dtype=np.float32, shape=["N"])
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on, an attribute before
        axes = gs.Constant(names.fresh(f"{PREFIX}/score/axes"), np.array([1], dtype=np.int64))
        node("ReduceMax", [stacked, axes], out, keepdims=0)
    else:
        node("ReduceMax", [stacked], out, keepdims=0, axes=[1])
    return [out, stacked_out] if parts_output else [out]
