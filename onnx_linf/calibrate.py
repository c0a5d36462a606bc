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

    def run(self, outputs: Sequence[str] | None, tensor: np.ndarray,
            batch_level: Iterable[str] = ()) -> list[np.ndarray]:
        """Run one batch.

        A model with a fixed batch size gets a short batch padded with copies of its first row;
        per-sample outputs are trimmed back, outputs named in `batch_level` (extremes over the
        batch axis) are left alone since duplicated rows do not change a max or a min.
        """
        n = tensor.shape[0]
        fb = self.fixed_batch
        if fb is None or fb == n:
            return self._run(outputs, tensor)
        if n > fb:
            raise UsageError(f"the model takes batches of exactly {fb}; got {n}")
        padded = np.concatenate([tensor, np.repeat(tensor[:1], fb - n, axis=0)])
        names = list(outputs) if outputs is not None else [o.name for o in self.inner.get_outputs()]
        skip = set(batch_level)
        return [o if name in skip else o[:n] for name, o in zip(names, self._run(outputs, padded))]

    def _run(self, outputs: Sequence[str] | None, tensor: np.ndarray) -> list[np.ndarray]:
        try:
            return self.inner.run(list(outputs) if outputs is not None else None, {self.input_name: tensor})
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidArgument...)
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeSessionError(f"ONNX Runtime failed to run the model: {msg}") from None


def create_session(model: Model, proto: onnx.ModelProto | None = None, provider: str = "auto",
                   threads: int | None = None) -> Session:
    """Create an ONNX Runtime session for `proto` (default: the model itself).

    Args:
        model: the loaded model (for its path, external data folder and input).
        proto: a modified model to run instead (instrumented, rewritten).
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
    if model.has_external_data:
        # Initializers stay on disk in their files; ORT resolves them from the model's folder, so
        # a >2 GB model is not materialised a second time in our process.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(model.base_dir.resolve()))
    try:
        payload = (proto or model.proto).SerializeToString()
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
    used = inner.get_providers()[0]
    if provider == "auto" and wanted:
        _cuda_usable = used == PROVIDERS["cuda"]
    if provider not in ("auto", "cpu") and used != PROVIDERS[provider]:
        raise RuntimeSessionError(
            f"provider {provider} could not be initialised (ONNX Runtime fell back to {used}); "
            "check the CUDA/cuDNN installation")
    batch_dim = model.input.shape[0]
    return Session(inner=inner, provider=used, input_name=model.input.name,
                   fixed_batch=batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None)


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
    """Iterate `iterable` in a background thread, `depth` items ahead (errors re-raised here)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    sentinel = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in iterable:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as exc:  # handed to the consumer thread
            q.put(_Raised(exc))
            return
        q.put(sentinel)

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
    try:
        for batch in prefetch(source.batches(batch_size)):
            tensor = model_tensor(batch, preprocess, trigger)
            values = session.run(outputs, tensor, batch_level)
            if on_batch is not None:
                on_batch(batch)
            yield dict(zip(outputs, values))
            progress.advance(len(batch))
    finally:
        progress.finish()
