"""The calibration batch loop: preprocess, prefetch (decoding overlaps inference), run, collect;
and the automatic batch size.

ORT sessions are made in `session`; statistics stay pure numpy in `stats`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import CalibrationDataError, UsageError
from ..model.load import Model
from ..model.taps import weightless
from .budget import input_bytes_per_image, require_within
from .preprocess import Preprocess, Trigger
from .session import PROVIDERS, Session, cuda_memory, resolve_provider
from .sources import Batch, DataSource

log = logging.getLogger(__name__)


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
    # The commands check the whole batch (maps included) before opening the data; this is the
    # last line for library callers: never allocate an input batch past the limit.
    require_within(batch_size * input_bytes_per_image(preprocess, session.input_dtype.itemsize),
                   f"{batch_size} inputs of {preprocess.num_channels}x{preprocess.size[0]}x{preprocess.size[1]}")
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
    ort_provider = resolve_provider(provider)
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

            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return cuda_memory()


def _activation_bytes_per_image(model: Model, taps: Sequence, size: tuple[int, int] | None) -> int | None:
    """Peak bytes of live activations for one image, walking the graph in order (None: unknown)."""
    graph = model.proto.graph
    # Shape inference on a copy without the weights' bytes: a weight only needs its type and
    # shape here, and copying the weights of a large model would cost more than the batch.
    light = weightless(model.proto)
    for vi in light.graph.input:
        if vi.name == model.input.name:
            dims = vi.type.tensor_type.shape.dim
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
