"""ONNX Runtime sessions: provider choice (CUDA when usable, CPU otherwise), I/O binding, fixed-batch padding."""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import RuntimeSessionError, UsageError
from ..model.load import Model
from .instrument import Instrumented

log = logging.getLogger(__name__)

#: Set after the first `auto` session: False once CUDA failed to initialise, so later sessions do
#: not pay for (and log) the failed attempt again.
_cuda_usable: bool | None = None

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


@dataclass
class Session:
    """An ONNX Runtime session plus the facts reports need."""

    inner: ort.InferenceSession
    """The ORT session."""
    provider: str
    """The execution provider that actually runs the model (first of the session's providers)."""
    input_name: str
    """Name of the model's image input."""
    fixed_batch: int | None
    """Static batch size of the input, if the model fixes one."""
    io_binding: bool | None = None
    """Run through ORT I/O binding; None (default): exactly when the CUDA provider runs."""
    input_dtype: np.dtype = np.dtype(np.float32)
    """Element type of the image input. Batches are cast to it when it is another float type
    (float16 and float64 models); an integer input gets the batch as is, and ORT's type error."""

    def _as_input(self, tensor: np.ndarray) -> np.ndarray:
        if tensor.dtype == self.input_dtype or self.input_dtype.kind != "f":
            return tensor
        return tensor.astype(self.input_dtype)

    @property
    def uses_binding(self) -> bool:
        """Whether runs go through I/O binding (see `io_binding`)."""
        return self.provider == PROVIDERS["cuda"] if self.io_binding is None else self.io_binding

    def stage(self, tensor: np.ndarray) -> np.ndarray | ort.OrtValue:
        """Get a batch ready for `run` ahead of time (the run loop calls this in its prefetch thread).

        With I/O binding on the CUDA provider, the batch is copied to the device here, so the
        host-to-device copy of batch k+1 overlaps the inference of batch k instead of preceding
        it. Everywhere else (and for a short batch that `run` must pad) it is returned as is.
        """
        tensor = self._as_input(tensor)
        if not self.uses_binding or self.provider != PROVIDERS["cuda"]:
            return tensor
        if self.fixed_batch is not None and tensor.shape[0] != self.fixed_batch:
            return tensor
        device = self.inner.get_provider_options().get(self.provider, {}).get("device_id", "0")
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensor), "cuda", int(device))

    def run(self, outputs: Sequence[str] | None, tensor: np.ndarray | ort.OrtValue,
            batch_level: Iterable[str] = ()) -> list[np.ndarray]:
        """Run one batch (a numpy array, or what `stage` returned).

        A model with a fixed batch size gets a short batch padded with copies of its first row;
        per-sample outputs are trimmed back, outputs named in `batch_level` (extremes over the
        batch axis) are left alone since duplicated rows do not change a max or a min.
        """
        if not isinstance(tensor, ort.OrtValue):
            tensor = self._as_input(tensor)
        n = tensor.shape()[0] if isinstance(tensor, ort.OrtValue) else tensor.shape[0]
        fb = self.fixed_batch
        if fb is None or fb == n:
            return self._run(outputs, tensor)
        if n > fb:
            # Verification and agreement inputs come in the command's batch size: run a fixed-batch
            # model (model-zoo graphs fix 1) on consecutive slices. Extremes over the batch axis
            # cannot be concatenated, and a staged device tensor cannot be sliced here.
            if batch_level or isinstance(tensor, ort.OrtValue):
                raise UsageError(f"the model takes batches of exactly {fb}; got {n}")
            parts = [self.run(outputs, tensor[i:i + fb]) for i in range(0, n, fb)]
            return [np.concatenate(chunk) for chunk in zip(*parts, strict=True)]
        padded = np.concatenate([tensor, np.repeat(tensor[:1], fb - n, axis=0)])
        names = list(outputs) if outputs is not None else [o.name for o in self.inner.get_outputs()]
        skip = set(batch_level)
        return [o if name in skip else o[:n] for name, o in zip(names, self._run(outputs, padded))]

    def _run(self, outputs: Sequence[str] | None, tensor: np.ndarray | ort.OrtValue) -> list[np.ndarray]:
        try:
            if self.uses_binding:
                return self._run_bound(outputs, tensor)
            return self.inner.run(list(outputs) if outputs is not None else None, {self.input_name: tensor})
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidArgument...)
            raise RuntimeSessionError(f"ONNX Runtime failed to run the model: {ort_message(exc)}") from None

    def _run_bound(self, outputs: Sequence[str] | None, tensor: np.ndarray | ort.OrtValue) -> list[np.ndarray]:
        binding = self.inner.io_binding()
        if isinstance(tensor, ort.OrtValue):
            binding.bind_ortvalue_input(self.input_name, tensor)
        else:
            binding.bind_cpu_input(self.input_name, tensor)
        names = list(outputs) if outputs is not None else [o.name for o in self.inner.get_outputs()]
        for name in names:
            # Host memory for exactly the fetched outputs: on a GPU the [N, C] reductions are all
            # that crosses to the host; the activations and unfetched outputs stay on the device.
            binding.bind_output(name, "cpu")
        self.inner.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return binding.copy_outputs_to_cpu()


def create_session(model: Model, proto: onnx.ModelProto | Instrumented | None = None, provider: str = "auto",
                   threads: int | None = None) -> Session:
    """Create an ONNX Runtime session for `proto` (default: the model itself).

    Args:
        model: the loaded model (for its path, external data folder and input).
        proto: a modified model to run instead (instrumented, rewritten). Pass an `Instrumented`
            itself rather than its ``.proto`` to skip building a full copy of the model.
        provider: ``auto`` (CUDA when usable, else CPU, quietly), ``cpu``, ``cuda`` or ``tensorrt``.
        threads: intra-op threads (None: ORT's default, all cores).

    Raises:
        UsageError: unknown provider name.
        RuntimeSessionError: the provider is not usable or ORT rejects the model.
    """
    provider = provider.lower()
    if provider != "auto" and provider not in PROVIDERS:
        raise UsageError(f"unknown provider {provider!r}: use auto, cpu, cuda or tensorrt")
    available = ort.get_available_providers()
    global _cuda_usable
    if provider == "auto":
        wanted = [PROVIDERS["cuda"]] if PROVIDERS["cuda"] in available and _cuda_usable is not False else []
    else:
        wanted = [PROVIDERS[provider]] if provider != "cpu" else []
        if wanted and wanted[0] not in available:
            raise RuntimeSessionError(
                f"provider {provider} is not available in this ONNX Runtime build "
                f"(available: {', '.join(available)})")
    options = ort.SessionOptions()
    # Severity 3 (errors only): a CUDA build without a GPU warns loudly about falling back to CPU.
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    # ORT's memory pattern pre-plans one block per input shape from the first run. With the many
    # short-lived maps of an instrumented graph its greedy packing wastes memory (measured on
    # ResNet-50, batch 16: +170 MB peak RSS, +65 MB for the plain model) and saves no time
    # (interleaved runs: same throughput); the arena still reuses freed blocks.
    options.enable_mem_pattern = False
    if not wanted and _shared_cpu_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    if model.has_external_data:
        # Initializers stay on disk in their files; ORT resolves them from the model's folder, so
        # a >2 GB model is not materialised a second time in our process.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(model.base_dir.resolve()))
    try:
        payload = proto.serialize() if isinstance(proto, Instrumented) else (proto or model.proto).SerializeToString()
    except ValueError as exc:  # protobuf refuses messages over 2 GB
        raise RuntimeSessionError(f"model too large to hand to ONNX Runtime in memory: {exc}") from None
    payload = _fit_ir_version(payload, model)
    if provider == "auto" and wanted:
        # A CUDA build of ORT without a usable GPU logs errors through the *default* logger when
        # the CUDA provider fails to load; `auto` is meant to fall back quietly, and the session
        # options cannot silence that logger, so raise its threshold for this one attempt.
        ort.set_default_logger_severity(4)
    try:
        inner = ort.InferenceSession(payload, sess_options=options,
                                     providers=wanted + [PROVIDERS["cpu"]])
    except Exception as exc:
        raise RuntimeSessionError(f"ONNX Runtime could not load the model: {ort_message(exc)}") from None
    finally:
        if provider == "auto" and wanted:
            ort.set_default_logger_severity(2)
    _release_model_bytes(inner)
    used = inner.get_providers()[0]
    if provider == "auto" and wanted:
        _cuda_usable = used == PROVIDERS["cuda"]
    if provider not in ("auto", "cpu") and used != PROVIDERS[provider]:
        raise RuntimeSessionError(
            f"provider {provider} could not be initialised (ONNX Runtime fell back to {used}); "
            "check the CUDA/cuDNN installation")
    batch_dim = model.input.shape[0]
    return Session(inner=inner, provider=used, input_name=model.input.name,
                   fixed_batch=batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None,
                   input_dtype=np.dtype(onnx.helper.tensor_dtype_to_np_dtype(model.input.elem_type)))


#: Whether the process-wide CPU arena is registered with ORT's environment (None: not tried yet).
_cpu_arena: bool | None = None


def _shared_cpu_arena() -> bool:
    """Register one CPU arena with ORT's environment, for every CPU session of this process.

    Each ORT session otherwise grows its own arena to the activations of its largest batch and
    keeps it for its whole life. A clamp holds one session per cross-fit fold (and more for
    verification) side by side: measured on ResNet-18 (batch 32, 224x224), five fold sessions
    kept five arenas and the command peaked at 4.1 GB RSS, 12x the model's plain inference. The
    sessions run one batch at a time, so one shared arena serves them all. Registered once per
    process (ORT refuses a second registration for the same memory info); if ORT rejects it,
    sessions keep their own arenas. The arena lives as long as the process and never shrinks: a
    long-running caller keeps its largest batch's activations reserved after its sessions are gone.
    """
    global _cpu_arena
    if _cpu_arena is None:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _cpu_arena = True
        except Exception as exc:  # an older ORT, or a CPU allocator another library registered
            log.debug("no shared CPU arena: %s", ort_message(exc))
            _cpu_arena = False
    return _cpu_arena


def ort_message(exc: BaseException, limit: int = 200) -> str:
    """ORT's error as one short line: its first line, without the ``[ONNXRuntimeError] : 1 : FAIL :``
    prefix and the C++ source location (``model.cc:256 Model(...)``) it puts in front of the reason."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    line = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", line)
    # "Load model from ... failed:/onnxruntime_src/.../model.cc:256 onnxruntime::Model::Model(...) reason"
    line = re.sub(r"\S*/[\w./-]+\.(?:cc|h|cpp):\d+\s+(?:[\w:~<>]+\([^)]*\)\s*)?", "", line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


#: Highest model IR version the installed ONNX Runtime loads (probed once; ORT has no API for it).
_ort_max_ir: int | None = None


def ort_max_ir_version() -> int:
    """Highest model IR version the installed ONNX Runtime loads, probed with a 1-node model."""
    global _ort_max_ir
    if _ort_max_ir is None:
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
        options = ort.SessionOptions()
        options.log_severity_level = 4
        _ort_max_ir = 3
        for ir in range(onnx.IR_VERSION + 2, 3, -1):
            probe = onnx.helper.make_model(graph, ir_version=ir, opset_imports=[onnx.helper.make_opsetid("", 13)])
            try:
                ort.InferenceSession(probe.SerializeToString(), sess_options=options, providers=[PROVIDERS["cpu"]])
            except Exception:  # "Unsupported model IR version": try the next lower one
                continue
            _ort_max_ir = ir
            break
    return _ort_max_ir


def _fit_ir_version(payload: bytes, model: Model) -> bytes:
    """The bytes to hand to ORT: an in-memory copy with a lower IR version when the model's is newer
    than the installed ORT loads and its opsets allow it (the IR version only says which format
    features the file may use; `onnx.helper.find_min_ir_version_for` gives the lowest one its opset
    imports need). Rewritten models keep the original IR version: only this copy is lowered.

    Raises:
        RuntimeSessionError: the opsets need an IR version this ORT does not load, or the lowered
            copy fails the ONNX checker (it uses a format feature newer than the lowered version).
    """
    have, top = model.proto.ir_version, ort_max_ir_version()
    if have <= top:
        return payload
    hint = "upgrade onnxruntime (pip install -U onnxruntime-gpu, or onnxruntime)"
    need = onnx.helper.find_min_ir_version_for(list(model.proto.opset_import), ignore_unknown=True)
    if need > top:
        raise RuntimeSessionError(
            f"the model has IR version {have} and its opsets need IR >= {need}; the installed ONNX Runtime "
            f"{ort.__version__} loads IR <= {top}", hint=hint)
    lowered = max(need, 3)
    reason = _lowering_problem(model, lowered)
    if reason is not None:
        raise RuntimeSessionError(
            f"the model has IR version {have}, the installed ONNX Runtime {ort.__version__} loads IR <= {top}, "
            f"and lowering it to IR {lowered} is not valid: {reason}", hint=hint)
    copy = onnx.ModelProto()
    copy.ParseFromString(payload)
    copy.ir_version = lowered
    log.info("running an in-memory copy with IR version %d (the model has %d; ONNX Runtime %s loads <= %d)",
             copy.ir_version, have, ort.__version__, top)
    return copy.SerializeToString()


#: (model sha256, IR version) -> why the model cannot be lowered to it (None: it can).
_lowering: dict[tuple[str, int], str | None] = {}


def _lowering_problem(model: Model, ir: int) -> str | None:
    """Why the model is not valid at IR version `ir`, or None.

    Lowering is sound only if the file uses no format feature newer than that version (4-bit and
    8-bit float types, function overloads ...); the checker knows which belongs to which IR. The
    model itself is checked, once: instrumented and rewritten copies only add float32/float16 ops.
    Models with external data (and over 2 GB) are not checked in memory.
    """
    key = (model.sha256, ir)
    if key not in _lowering:
        problem = None
        if not model.has_external_data and model.proto.ByteSize() < 2**31 - 1:
            copy = onnx.ModelProto()
            copy.CopyFrom(model.proto)
            copy.ir_version = ir
            try:
                onnx.checker.check_model(copy)
            except onnx.checker.ValidationError as exc:
                problem = str(exc).strip().splitlines()[0] if str(exc).strip() else "validation failed"
        _lowering[key] = problem
    return _lowering[key]


def _release_model_bytes(inner: ort.InferenceSession) -> None:
    """Drop the serialized model ORT's Python wrapper keeps for the session's whole life.

    `InferenceSession` holds the bytes it was created from only to rebuild the session if a run
    fails on a GPU provider and it falls back to the CPU. That is a second full copy of the
    weights in our process (+100 MB peak RSS on ResNet-50), and the fallback would be wrong for
    us anyway: reports name the provider that ran, so a failed GPU run must fail, not switch
    providers silently. Guarded, because the attribute is private to the wrapper.
    """
    if getattr(inner, "_model_bytes", None) is not None:
        inner.disable_fallback()
        inner._model_bytes = None


def resolve_provider(provider: str) -> str:
    if provider in PROVIDERS.values():
        return provider
    name = provider.lower()
    if name == "auto":
        usable = (PROVIDERS["cuda"] in ort.get_available_providers() and _cuda_usable is not False
                  and cuda_memory() is not None)
        return PROVIDERS["cuda"] if usable else PROVIDERS["cpu"]
    if name not in PROVIDERS:
        raise UsageError(f"unknown provider {provider!r}: use auto, cpu, cuda or tensorrt")
    return PROVIDERS[name]


def cuda_memory() -> int | None:
    """Free memory of the current CUDA device through the CUDA runtime, or None without one."""

    for lib in ("libcudart.so", "libcudart.so.12", "libcudart.so.11.0", "cudart64_12.dll", "cudart64_110.dll"):
        try:
            cudart = ctypes.CDLL(lib)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if cudart.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0:
            return int(free.value)
        return None
    return None
