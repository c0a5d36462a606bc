"""What every rewrite shares: graph facts read before any edit, fresh names, and a graphsurgeon
import/export that restores what graphsurgeon does not round-trip.

Every rewrite keeps the graph's input and output names, types and shapes, the IR version, the
opset imports and the model metadata, and never modifies the input `Model`'s proto.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from ..errors import RewriteError, UnsupportedModelError
from ..model.load import Model
from ..model.taps import infer_shapes

log = logging.getLogger(__name__)


#: Element types a fold may edit (numpy can represent them exactly).
FOLDABLE_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})

PREFIX = "onnx_linf"


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `graph` and of its subgraphs (If/Loop/Scan bodies), depth first."""
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from walk_nodes(sub)


def walk_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from walk_graphs(sub)


class Names:
    """Every node and tensor name in the model, to mint new names that collide with none."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        taken: set[str] = set()
        for graph in walk_graphs(proto.graph):
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


class GraphFacts:
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
        for node in walk_nodes(graph):
            self.uses.update(i for i in node.input if i)
        self.graph_outputs = {o.name for o in graph.output}
        self.uses.update(o.name for o in graph.output)
        # Models with IR version < 4 also list initializers as graph inputs: a caller may feed a
        # different value at run time, so such a "weight" is not a constant we may edit.
        self.graph_inputs = {i.name for i in graph.input}
        self.initializers = {init.name: init for init in graph.initializer}
        self.constant_nodes = {n.output[0]: n for n in self.nodes if n.op_type == "Constant" and n.output}
        self.types, self.shapes = tensor_types(proto)

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
        if init.data_type not in FOLDABLE_TYPES:
            return f"'{name}' has element type {onnx.TensorProto.DataType.Name(init.data_type)}"
        return None

    def shared(self, name: str) -> bool:
        """True when more than one node input reads `name` (it must be cloned before editing)."""
        return self.uses[name] > 1


def tensor_types(proto: onnx.ModelProto) -> tuple[dict[str, int], dict[str, tuple]]:
    """Element types and shapes of the graph's tensors (`taps.infer_shapes`, best effort), symbolic
    dims as None, initializers included."""
    inferred, types = infer_shapes(proto)
    shapes: dict[str, tuple] = {name: tuple(d if isinstance(d, int) else None for d in dims)
                                for name, dims in inferred.items()}
    for init in proto.graph.initializer:
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


def np_dtype(tensor: str, facts: GraphFacts) -> np.dtype:
    """numpy dtype for constants combined with `tensor` (ONNX Mul/Min/Max need equal types)."""
    elem_type = facts.types.get(tensor)
    if elem_type is None:
        # Shape inference could not type it; classifier maps are float32.
        return np.dtype(np.float32)
    if elem_type not in FOLDABLE_TYPES:
        raise RewriteError(f"'{tensor}' has element type {onnx.TensorProto.DataType.Name(elem_type)}; "
                           "only float16/float32/float64 maps can be rewritten")
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def import_graph(proto: onnx.ModelProto) -> gs.Graph:
    # graphsurgeon exports not-yet-loaded initializers by reusing the *imported* TensorProto
    # objects: import from a private copy so nothing we do can reach the caller's model.
    private = onnx.ModelProto()
    private.CopyFrom(proto)
    return gs.import_onnx(private)


class Nodes:
    """Mints the nodes of one rewrite at one tensor (`tap`) with fresh names under ``PREFIX/space``
    and the model's opset conventions; constants and outputs default to `dtype`."""

    def __init__(self, names: Names, opset: int, tap: str, dtype: np.dtype, space: str = "clamp") -> None:
        self.names, self.opset, self.tap, self.dtype, self.space = names, opset, tap, dtype, space
        self.nodes: list[gs.Node] = []

    def const(self, what: str, value, dtype: np.dtype | None = None) -> gs.Constant:
        return gs.Constant(self.names.fresh(f"{PREFIX}/{what}/{self.tap}"),
                           np.asarray(value, dtype=dtype or self.dtype))

    def __call__(self, op: str, inputs: list, what: str, out: gs.Variable | None = None,
                 dtype: np.dtype | None = None, **attrs) -> gs.Variable:
        where = f"{PREFIX}/{self.space}/{self.tap}"
        out = out or gs.Variable(self.names.fresh(f"{where}/{what}"), dtype=dtype or self.dtype)
        self.nodes.append(gs.Node(op, self.names.fresh(f"{where}/{op}"), attrs=attrs, inputs=inputs, outputs=[out]))
        return out

    def reduce_max(self, x: gs.Variable, axes: list[int], what: str) -> gs.Variable:
        return self.reduce(x, "ReduceMax", axes, what)

    def reduce(self, x: gs.Variable, op: str, axes: list[int], what: str, keepdims: int = 0) -> gs.Variable:
        # ReduceMax/Min take `axes` as an attribute up to opset 17 and as an input from 18 on.
        if self.opset >= 18:
            axes_c = gs.Constant(self.names.fresh(f"{PREFIX}/axes/{self.tap}"), np.array(axes, dtype=np.int64))
            return self(op=op, inputs=[x, axes_c], what=what, keepdims=keepdims)
        return self(op=op, inputs=[x], what=what, keepdims=keepdims, axes=axes)


def splice_after(graph: gs.Graph, tensor: gs.Variable, names: Names,
                  build: Callable[[gs.Variable, gs.Variable], list[gs.Node]]) -> str:
    """Insert nodes right after `tensor`'s producer so that they read the producer's value and
    *write `tensor` itself*.

    The producer is given a fresh output; the original tensor object, with its name, type and every
    reference to it (consumers, subgraphs reading it from outer scope, graph outputs), now holds the
    spliced result. Nothing needs rewiring, and graph output names stay unchanged by construction.
    """
    producer = tensor.inputs[0]
    raw = gs.Variable(names.fresh(f"{PREFIX}/raw/{tensor.name}"), dtype=tensor.dtype, shape=tensor.shape)
    producer.outputs[producer.outputs.index(tensor)] = raw
    nodes = build(raw, tensor)
    pos = graph.nodes.index(producer) + 1
    graph.nodes[pos:pos] = nodes  # right after the producer: keeps topological order
    return raw.name


def export_graph(graph: gs.Graph, source: onnx.ModelProto, renamed: Mapping[str, str],
                 extra_outputs: Sequence[str] = ()) -> onnx.ModelProto:
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
    exported = {o.name: o for o in g.output}
    del g.output[:]
    g.output.extend(sg.output)
    # Outputs a rewrite adds on purpose (the clamp's score) follow the model's own, in order.
    g.output.extend(exported[name] for name in extra_outputs)
    if hasattr(sg, "metadata_props"):  # GraphProto.metadata_props exists from onnx 1.16 (IR 10)
        del g.metadata_props[:]
        g.metadata_props.extend(sg.metadata_props)
    # The export drops initializers no node reads. Put back those the source did not read either
    # (they are part of the model as given); ones our copy-on-write edits orphaned stay dropped.
    have = {i.name for i in g.initializer}
    read = {name for node in walk_nodes(sg) for name in node.input}
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
    list_initializers_as_inputs(out, source)
    return out


def list_initializers_as_inputs(proto: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """Keep graph inputs and initializers consistent after an edit.

    Below IR version 4 every initializer must also be a graph input (the checker's "... in
    initializer but not in graph input"; model-zoo graphs are IR 3): the ones a rewrite added are
    listed after the original inputs, so the image input stays first. An initializer of the source
    that a copy-on-write edit orphaned (and the export dropped) is unlisted too: left as an input it
    would become a runtime input with no value.
    """
    was = {i.name for i in source.graph.initializer}
    have = {i.name for i in proto.graph.initializer}
    kept = [vi for vi in proto.graph.input if vi.name not in was or vi.name in have]
    if len(kept) != len(proto.graph.input):
        del proto.graph.input[:]
        proto.graph.input.extend(kept)
    if proto.ir_version >= 4:
        return
    listed = {vi.name for vi in proto.graph.input}
    proto.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                             for i in proto.graph.initializer if i.name not in listed)
