"""Classes an image the score gate flagged must not be given: the suspected targets, excluded.

A gated image (one whose channel means left the clean range, `rewrite.clamp`) pushed towards clean
averages mostly loses its class; where it lands is close to chance, and when chance favours the
backdoor's target (measured: 20% of a ResNet-8 SIG model's gated triggered images) the
prediction-level attack success stays up although the backdoor was detected. When the target is
known or suspected (the probe families of ``scan --verdict``), the rewritten classifier output
gives a gated image's excluded classes its smallest score, so its top-1 class is another one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import RewriteError
from .graph import GraphFacts, Names, Nodes, np_dtype, splice_after


def exclusion_mask(classes: Sequence[int], count: int, output: str) -> np.ndarray:
    """bool ``[1, count]``, True at `classes`; RewriteError for a class outside ``[0, count)``."""
    bad = sorted({int(c) for c in classes if not 0 <= int(c) < count})
    if bad:
        raise RewriteError(f"classes {bad} are not among the {count} classes of '{output}'")
    mask = np.zeros((1, count), dtype=np.bool_)
    mask[0, [int(c) for c in classes]] = True
    return mask


def exclude_when_gated(graph: gs.Graph, tensors: dict, facts: GraphFacts, names: Names, opset: int,
                       flag: gs.Variable, output: str, classes: Sequence[int]) -> str:
    """Write ``Where(flag & excluded, min over classes, scores)`` into the classifier output
    `output` (``[N, K]``, static K); `flag` is the gate's bool ``[N, 1, 1, 1]``. Returns the name
    the output's producer now writes. Rows the gate did not flag are passed through bit for bit.
    """
    shape = facts.shapes.get(output)
    if output not in facts.producer or output not in tensors:
        raise RewriteError(f"unknown classifier output '{output}'")
    if shape is None or len(shape) != 2 or not isinstance(shape[1], int):
        raise RewriteError(f"excluding classes needs a classifier output [N, K] with a static K; '{output}' has "
                           f"shape {shape}")
    mask = exclusion_mask(classes, shape[1], output)

    def build(raw: gs.Variable, out: gs.Variable) -> list[gs.Node]:
        n = Nodes(names, opset, output, np_dtype(output, facts), space="exclude")
        row = n("Reshape", [flag, n.const("row", [-1, 1], np.int64)], "gated_row", dtype=np.bool_)
        hit = n("And", [row, n.const("classes", mask, np.bool_)], "excluded", dtype=np.bool_)
        lowest = n.reduce(raw, "ReduceMin", [1], "lowest", keepdims=1)
        n("Where", [hit, lowest, raw], "exclude", out=out)
        return n.nodes

    return splice_after(graph, tensors[output], names, build)
