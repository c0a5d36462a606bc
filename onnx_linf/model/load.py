"""Stage 1: read and validate an ONNX model.

The rest of the pipeline works on a `Model`: the parsed proto (weights included for models under
2 GB; external-data models keep their weights on disk and are handed to ONNX Runtime by path), the
one image input, and the facts a report needs (sha256, opset).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from google.protobuf.message import DecodeError

from ..errors import ModelLoadError, UnsupportedModelError

log = logging.getLogger(__name__)


#: Operator domains ONNX Runtime's default build executes. A node from any other domain needs a
#: custom-op library we do not have, so the model could not be run for calibration.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"})


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of a graph input or output."""

    name: str
    """ONNX tensor name."""
    elem_type: int
    """`onnx.TensorProto` data type enum."""
    shape: tuple[int | str | None, ...]
    """Dimensions: an int when static, the symbolic name or None when dynamic."""

    @property
    def dtype_name(self) -> str:
        """Numpy-style name of the element type, e.g. ``float32``."""
        return onnx.helper.tensor_dtype_to_np_dtype(self.elem_type).name

#: Operators of quantized graphs: QDQ format (Quantize/DequantizeLinear around float ops) and
#: QOperator format (integer kernels).
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                           "ConvInteger", "QLinearMatMul", "MatMulInteger", "QLinearAdd", "QLinearMul",
                           "QLinearGlobalAveragePool", "QLinearAveragePool"})


@dataclass(frozen=True)
class Model:
    """A loaded, validated ONNX model."""

    path: Path
    """Where the model was read from."""
    proto: onnx.ModelProto = field(repr=False)
    """The parsed model. External data is *not* loaded (see `has_external_data`)."""
    sha256: str
    """sha256 of the model file's bytes (external data files not included)."""
    input: TensorSpec
    """The single real (non-initializer) graph input."""
    outputs: tuple[TensorSpec, ...]
    """Graph outputs, in order."""
    opset: int
    """Version of the default ("" / ai.onnx) operator set."""
    has_external_data: bool
    """True when some initializers live in external files next to the model."""
    lifted_from: int | None = None
    """Default-domain opset of the file when `proto` is a copy lifted to `opset` by
    onnx.version_converter (clamp lifts opset 7 to 8); None for the model as read."""

    @property
    def base_dir(self) -> Path:
        """Folder external-data locations are relative to."""
        return self.path.parent

    @property
    def quantized_ops(self) -> list[str]:
        """Quantization operators in the graph (QDQ pairs, QLinearConv, ConvInteger ...), sorted."""
        return sorted({n.op_type for n in self.proto.graph.node if n.op_type in QUANTIZED_OPS})


def _spec(value_info: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value_info.type.tensor_type
    dims: list[int | str | None] = []
    if tensor_type.HasField("shape"):
        for d in tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
    return TensorSpec(value_info.name, int(tensor_type.elem_type), tuple(dims))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_location(location: str, tensor: str, base_dir: Path) -> Path:
    """The path of an external-data location, refused unless it stays inside the model's folder.

    Decided from the string before any filesystem call: an absolute path or a ``..`` component is
    refused without looking at it, so the error is the same whether the file exists or not (no
    existence oracle) and nothing outside the folder is ever opened. What is left can still leave
    the folder through a symlink inside it, which the resolved path catches.
    """
    if not location or PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute() \
            or PureWindowsPath(location).drive or location.startswith(("/", "\\")):
        raise ModelLoadError(f"external data location '{location}' of '{tensor}' is an absolute path: refused "
                             "(locations are relative to the model's folder)")
    if ".." in PurePosixPath(location.replace("\\", "/")).parts:
        raise ModelLoadError(f"external data location '{location}' of '{tensor}' is outside the model's folder: "
                             "refused")
    base = base_dir.resolve()
    path = (base / location).resolve()
    if base not in path.parents:
        raise ModelLoadError(f"external data location '{location}' of '{tensor}' is outside the model's folder "
                             "(through a symlink): refused")
    return path


def _check_external_data(proto: onnx.ModelProto, base_dir: Path) -> bool:
    """Return True if the model uses external data; raise if a referenced file is missing."""
    uses_external = False
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        uses_external = True
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        location = _safe_location(info.location, tensor.name, base_dir)
        if not location.is_file():
            raise ModelLoadError(
                f"external data file '{info.location}' of initializer '{tensor.name}' not found "
                f"next to the model (looked in {base_dir})",
                hint="keep the .onnx file and its external data files in the same folder",
            )
    return uses_external


def real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time.

    Models with IR version < 4 list every initializer among the graph inputs as well; those are
    weights, not inputs.
    """
    initializer_names = {init.name for init in graph.initializer}
    return [vi for vi in graph.input if vi.name not in initializer_names]


def load_model(path: str | os.PathLike) -> Model:
    """Read and validate an ONNX model.

    Args:
        path: path to a ``.onnx`` file. External data files must sit where the model says.

    Returns:
        The validated `Model`.

    Raises:
        ModelLoadError: missing file, bytes that are not an ONNX model, missing external data, or
            a model the ONNX checker rejects.
        UnsupportedModelError: custom-domain operators, or not exactly one image-like input.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"not a valid ONNX model: {path} ({type(exc).__name__}: {exc})") from None
    # Protobuf happily parses many arbitrary byte strings into an empty message; a real model has
    # an IR version and a graph with nodes.
    if proto.ir_version == 0 or len(proto.graph.node) == 0:
        raise ModelLoadError(f"not a valid ONNX model: {path} (no IR version or empty graph)")

    has_external = _check_external_data(proto, path.parent)
    try:
        # The path form lets the checker handle models > 2 GB and resolve external data.
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "validation failed"
        raise ModelLoadError(f"ONNX checker rejected {path}: {first_line}") from None

    custom = sorted({(n.domain, n.op_type) for n in proto.graph.node if n.domain not in KNOWN_DOMAINS})
    if custom:
        ops = ", ".join(f"{d}::{op}" for d, op in custom)
        raise UnsupportedModelError(
            f"model uses custom-domain operators ONNX Runtime cannot run without a plugin: {ops}"
        )

    inputs = real_inputs(proto.graph)
    if len(inputs) != 1:
        names = ", ".join(vi.name for vi in inputs) or "none"
        raise UnsupportedModelError(
            f"onnx-linf needs a model with exactly one image input; this one has {len(inputs)} ({names})"
        )
    spec = _spec(inputs[0])
    if len(spec.shape) != 4:
        raise UnsupportedModelError(
            f"input '{spec.name}' has rank {len(spec.shape)}; an image classifier input must be 4-D "
            "(NCHW or NHWC)"
        )

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    model = Model(
        path=path,
        proto=proto,
        sha256=_sha256(path),
        input=spec,
        outputs=tuple(_spec(o) for o in proto.graph.output),
        opset=int(opset),
        has_external_data=has_external,
    )
    log.debug("loaded %s: opset %d, input %s %s", path, model.opset, spec.name, spec.shape)
    return model
