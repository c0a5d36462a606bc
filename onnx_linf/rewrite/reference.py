"""The independent masked reference that `verify` compares a zeroing surgery against.

Built with plain protobuf edits and its own helpers (no graphsurgeon, nothing shared with `zero`),
so a bug in the surgery cannot hide in the reference.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import RewriteError
from ..model.load import Model


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
    if proto.ir_version < 4:  # IR < 4: every initializer is a graph input too (model-zoo graphs)
        listed = {vi.name for vi in graph.input}
        graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                           for i in graph.initializer if i.name not in listed)
    return proto
