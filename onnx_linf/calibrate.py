"""Stage 4: ONNX Runtime sessions and the calibration batch loop.

ORT sessions live here (and are used by `verify`/`evaluate`); statistics stay pure numpy in
`stats`. Data sources and preprocessing are in `data`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .data import Batch, DataSource, Preprocess, Trigger
from .errors import CalibrationDataError, RuntimeSessionError, UsageError
from .instrument import Instrumented
from .load import Model

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------

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
            raise UsageError(f"the model takes batches of exactly {fb}; got {n}")
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
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeSessionError(f"ONNX Runtime failed to run the model: {msg}") from None

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
    if model.has_external_data:
        # Initializers stay on disk in their files; ORT resolves them from the model's folder, so
        # a >2 GB model is not materialised a second time in our process.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(model.base_dir.resolve()))
    try:
        payload = proto.serialize() if isinstance(proto, Instrumented) else (proto or model.proto).SerializeToString()
    except ValueError as exc:  # protobuf refuses messages over 2 GB
        raise RuntimeSessionError(f"model too large to hand to ONNX Runtime in memory: {exc}") from None
    if provider == "auto" and wanted:
        # A CUDA build of ORT without a usable GPU logs errors through the *default* logger when
        # the CUDA provider fails to load; `auto` is meant to fall back quietly, and the session
        # options cannot silence that logger, so raise its threshold for this one attempt.
        ort.set_default_logger_severity(4)
    try:
        inner = ort.InferenceSession(payload, sess_options=options,
                                     providers=wanted + [PROVIDERS["cpu"]])
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeSessionError(f"ONNX Runtime could not load the model: {msg}") from None
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


def model_tensor(batch: Batch, preprocess: Preprocess, trigger: Trigger | None = None) -> np.ndarray:
    """The model input for a batch, stamping the trigger on pixels first when given."""
    if batch.pixels is not None:
        pixels = trigger.stamp(batch.pixels) if trigger is not None else batch.pixels
        return preprocess.apply(pixels)
    if trigger is not None:
        raise CalibrationDataError("cannot stamp a trigger on already-preprocessed float arrays; "
                                   "give uint8 pixels or an image folder")
    return batch.tensor


class Progress:
    """Receives progress from long library calls; the CLI subclasses it to draw a bar.

    The default implementation does nothing, so library users pay nothing for it.
    """

    def start(self, task: str, total: int | None) -> None:
        """A task begins; `total` units are expected (None: unknown)."""

    def advance(self, n: int) -> None:
        """`n` more units are done."""

    def finish(self) -> None:
        """The current task ended."""


def prefetch(iterable: Iterable, depth: int = 2) -> Iterator:
    """Iterate `iterable` in a background thread, `depth` items ahead (errors re-raised here).

    When the consumer stops early, the worker stops too and closes `iterable` (a generator's
    decode pool and buffered batches are released instead of waiting forever on a full queue).
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    sentinel = object()
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in iterable:
                if not put(item):
                    break
            else:
                put(sentinel)
        except BaseException as exc:  # handed to the consumer thread
            put(_Raised(exc))
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is sentinel:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()


@dataclass
class _Raised:
    exc: BaseException


def run_batches(session: Session, source: DataSource, preprocess: Preprocess, outputs: Sequence[str],
                batch_size: int, trigger: Trigger | None = None,
                progress: Progress | None = None, batch_level: Iterable[str] = (),
                on_batch: Callable[[Batch], None] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Stream a source through a session; yield ``{output_name: array}`` per batch.

    Memory is constant in the number of images: one batch (plus the decode-ahead window) at a time.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if session.fixed_batch is not None:
        batch_size = session.fixed_batch
    progress = progress or Progress()
    progress.start("calibrate", len(source))

    def staged() -> Iterator[tuple[Batch, np.ndarray | ort.OrtValue]]:
        # Runs in the prefetch thread: decoding, preprocessing (and the copy to the GPU when I/O
        # binding is on) of the next batches overlap the inference of the current one, so the
        # loop below only feeds ONNX Runtime. Both release the GIL for their heavy parts.
        for batch in source.batches(batch_size):
            yield batch, session.stage(model_tensor(batch, preprocess, trigger))

    try:
        for batch, tensor in prefetch(staged()):
            values = session.run(outputs, tensor, batch_level)
            if on_batch is not None:
                on_batch(batch)
            yield dict(zip(outputs, values))
            progress.advance(len(batch))
    finally:
        progress.finish()


# --------------------------------------------------------------------------------------------
# Batch size
# --------------------------------------------------------------------------------------------

#: Batch sizes past which throughput hardly improves. CPU: ORT's convolutions are parallel within
#: one image; measured on ResNet-50 (2 cores), images/s at batch 1, 4, 8, 16, 32 were about
#: 1 : 1.5 : 2.1 : 2.2 : 2.4, so 32 buys ~9% for twice the activation memory. GPU: kernels need
#: large batches to fill the device.
THROUGHPUT_CAP = {"CPUExecutionProvider": 16, "CUDAExecutionProvider": 128, "TensorrtExecutionProvider": 128}
#: Share of the available memory a batch may take: host RAM is shared with decoding and the rest
#: of the machine; the GPU's free memory also has to hold ORT's arena growth and cuDNN workspaces.
MEMORY_SHARE = {"CPUExecutionProvider": 0.25, "CUDAExecutionProvider": 0.5, "TensorrtExecutionProvider": 0.5}
#: ORT's real use above the liveness estimate: blocked layouts pad channels, fused nodes keep
#: inputs longer, the arena rounds blocks up (measured, ResNet-50 scan of all maps, peak RSS
#: between batch 8 and 16: 1.1x the estimate per image).
ESTIMATE_SLACK = 1.5


@dataclass(frozen=True)
class BatchChoice:
    """What `auto_batch_size` picked, and why (for the report and the CLI)."""

    batch_size: int
    """Images per ORT run."""
    provider: str
    """The ORT provider the choice is for."""
    per_image_bytes: int | None
    """Estimated peak memory of one image's activations in a scan (None: not estimable)."""
    budget_bytes: int | None
    """Memory the batch was allowed to use (None: unknown)."""
    reason: str
    """One line explaining the choice."""


def auto_batch_size(model: Model, provider: str = "auto", *, taps: Sequence = (), images: int | None = None,
                    size: tuple[int, int] | None = None, memory_bytes: int | None = None) -> BatchChoice:
    """Pick the largest batch that fits in memory and still pays off on `provider`.

    The activation memory of one image is estimated from ONNX shape inference (batch 1) by
    walking the graph in order and freeing each tensor after its last consumer, plus the largest
    tapped map (the scan's reductions need one temporary of that size at a time) and the input
    batches the loader keeps in flight; `ESTIMATE_SLACK` covers what ORT adds. The budget is
    `MEMORY_SHARE` of the memory available now (host RAM for the CPU, free device memory for
    CUDA), and the batch is capped by `THROUGHPUT_CAP` and by the number of images.

    Args:
        model: the loaded model.
        provider: ``auto``, ``cpu``, ``cuda``, ``tensorrt``, or an ORT provider name such as
            ``session.provider`` (best: the provider that actually runs).
        taps: the maps the scan measures (their size adds to the estimate).
        images: number of calibration images (no batch larger than that).
        size: (H, W) of the input when the model's spatial size is dynamic.
        memory_bytes: memory budget to use instead of `MEMORY_SHARE` of what is available.

    Returns:
        The choice; a model with a fixed batch size always gets that size.
    """
    ort_provider = _resolve_provider(provider)
    batch_dim = model.input.shape[0] if model.input.shape else None
    if isinstance(batch_dim, int) and batch_dim > 0:
        return BatchChoice(batch_dim, ort_provider, None, None, f"the model fixes the batch size to {batch_dim}")
    cap = THROUGHPUT_CAP.get(ort_provider, 16)
    few = images is not None and images < cap
    if few:
        cap = max(1, images)
    per_image = _activation_bytes_per_image(model, taps, size)
    if memory_bytes is not None:
        budget, where = int(memory_bytes), "the given budget"
    else:
        available = _available_memory(ort_provider)
        if available is None:
            budget, where = None, None
        else:
            share = MEMORY_SHARE.get(ort_provider, 0.25)
            budget = int(available * share)
            kind = "host" if ort_provider == PROVIDERS["cpu"] else "GPU"
            where = f"{share:.0%} of {available / 2**20:.0f} MB available {kind} memory"
    if per_image is None or budget is None:
        batch = min(cap, 8)
        unknown = "activation sizes" if per_image is None else "available memory"
        return BatchChoice(batch, ort_provider, per_image, budget,
                           f"batch {batch}: {unknown} unknown, a conservative default")
    fits = max(1, int(budget // (per_image * ESTIMATE_SLACK)))
    if few and fits >= cap:
        batch, limit = cap, "image-count"  # all images in one run
    else:
        batch = 1 << (min(cap, fits).bit_length() - 1)  # a power of two: conventional, and no worse
        limit = "throughput" if fits >= cap else "memory"
    return BatchChoice(batch, ort_provider, per_image, budget,
                       f"batch {batch} ({limit}-bound): ~{per_image * ESTIMATE_SLACK / 2**20:.1f} MB per image "
                       f"(estimate incl. slack), budget {budget / 2**20:.0f} MB = {where}; "
                       f"{ort_provider} gains little past {THROUGHPUT_CAP.get(ort_provider, 16)}")


def _resolve_provider(provider: str) -> str:
    if provider in PROVIDERS.values():
        return provider
    name = provider.lower()
    if name == "auto":
        usable = (PROVIDERS["cuda"] in ort.get_available_providers() and _cuda_usable is not False
                  and _cuda_memory() is not None)
        return PROVIDERS["cuda"] if usable else PROVIDERS["cpu"]
    if name not in PROVIDERS:
        raise UsageError(f"unknown provider {provider!r}: use auto, cpu, cuda or tensorrt")
    return PROVIDERS[name]


def _available_memory(ort_provider: str) -> int | None:
    if ort_provider == PROVIDERS["cpu"]:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            import os

            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return _cuda_memory()


def _cuda_memory() -> int | None:
    """Free memory of the current CUDA device through the CUDA runtime, or None without one."""
    import ctypes

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


def _activation_bytes_per_image(model: Model, taps: Sequence, size: tuple[int, int] | None) -> int | None:
    """Peak bytes of live activations for one image, walking the graph in order (None: unknown)."""
    graph = model.proto.graph
    # Shape inference on a copy without the weights' bytes: a weight only needs its type and
    # shape here, and copying the weights of a large model would cost more than the batch.
    light = onnx.ModelProto()
    light.ir_version, light.producer_name = model.proto.ir_version, model.proto.producer_name
    light.opset_import.extend(model.proto.opset_import)
    g = light.graph
    g.node.extend(graph.node)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    inputs = {i.name for i in graph.input}
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.INT64 and _numel(init.dims) <= 64:
            g.initializer.append(init)  # shape arguments (Reshape targets...) keep their values
        elif init.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    for vi in graph.input:
        vi2 = g.input.add()
        vi2.CopyFrom(vi)
        if vi.name == model.input.name:
            dims = vi2.type.tensor_type.shape.dim
            spatial = (1, 2) if len(dims) == 4 and dims[3].dim_value in (1, 3) else (2, 3)
            for i, d in enumerate(dims):
                if i == 0:
                    d.Clear()
                    d.dim_value = 1
                elif size is not None and len(dims) == 4 and i in spatial and not d.HasField("dim_value"):
                    d.Clear()
                    d.dim_value = size[spatial.index(i)]
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as exc:  # best effort: no estimate
        log.debug("shape inference failed: %s", exc)
        return None
    sizes: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            item = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize if tt.elem_type else 4
            sizes[vi.name] = _numel([d.dim_value for d in tt.shape.dim]) * item
    weights = {init.name for init in graph.initializer}
    if model.input.name not in sizes:
        return None
    last_use: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = i
    outputs = {o.name for o in graph.output}
    live = sizes[model.input.name]
    peak = live
    unknown = 0
    for i, node in enumerate(graph.node):
        for name in node.output:
            if name in sizes:
                live += sizes[name]
            elif name:
                unknown += 1
        peak = max(peak, live)
        for name in set(node.input):
            if name and name not in weights and last_use.get(name) == i and name not in outputs and name in sizes:
                live -= sizes[name]
    if unknown > len(graph.node) // 2:
        return None  # mostly dynamic shapes: the walk would say nothing useful
    largest_tap = max((sizes.get(t.name, 0) for t in taps), default=0)
    # The loader keeps up to 4 input batches in flight (prefetch depth 2, the one running, the one
    # being preprocessed), as float32 plus the decoded uint8 pixels.
    in_flight = 4 * sizes[model.input.name] * 5 // 4
    return int(peak + largest_tap + in_flight)


def _numel(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n
