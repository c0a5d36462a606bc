"""Model queries with accounting: the query budget, the time limit, and the calibration image pool."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence

import numpy as np

from ...errors import CalibrationDataError
from ...measure.preprocess import Preprocess
from ...measure.session import Session
from ...measure.sources import ArraySource, Batch, DataSource, ImageFolder

# Images per ORT call for evaluation-only passes, and input bytes per call at most (memory bounds,
# not tuning knobs).
EVAL_CHUNK = 256

CALL_BYTES = 64 << 20


class OutOfBudget(Exception):
    """A forward pass would exceed the query budget or start after the time limit."""


class Oracle:
    """The model as a black box: counts image forwards and enforces the budget before every call."""

    def __init__(self, session: Session, output: str, preprocess: Preprocess, max_queries: int | None,
                 deadline: float | None) -> None:
        self.session = session
        self.output = output
        self.preprocess = preprocess
        self.max_queries = max_queries
        self.deadline = deadline
        self.queries = 0
        self.ceiling: int | None = None
        """Temporary cap on `queries` for one phase (pruning), on top of the budget."""
        self.probabilities = False
        """True when the model outputs probabilities (rows of non-negative values summing to 1)."""

    def remaining(self) -> float:
        """Queries left (inf without a budget)."""
        return math.inf if self.max_queries is None else self.max_queries - self.queries

    def affordable(self, n: int) -> bool:
        """Whether `n` more image forwards fit the budget and the time limit."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.ceiling is not None and self.queries + n > self.ceiling:
            return False
        return n <= self.remaining()

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Model outputs ``[n, classes]`` for float or uint8 pixels ``[n, H, W, C]``.

        Raises:
            OutOfBudget: the call would exceed the query budget or the time limit.
        """
        n = int(pixels.shape[0])
        if not self.affordable(n):
            raise OutOfBudget
        # Models with a static batch dimension take exactly that many images per call; others get
        # chunks of about CALL_BYTES of input, so large images do not blow up memory.
        chunk = self.session.fixed_batch or max(1, min(1024, CALL_BYTES // max(1, pixels[0].size * 4)))
        outs = []
        for i in range(0, n, chunk):
            tensor = self.preprocess.apply(pixels[i:i + chunk])
            out = self.session.run([self.output], tensor)[0]
            outs.append(np.asarray(out, dtype=np.float64).reshape(out.shape[0], -1))
        self.queries += n
        return np.concatenate(outs)

    def log_probs(self, pixels: np.ndarray) -> np.ndarray:
        """Log-probabilities per class, whether the model outputs logits or probabilities."""
        out = self.logits(pixels)
        if self.probabilities:
            return np.log(np.clip(out, 1e-12, None))
        z = out - out.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class PixelSource(DataSource):
    """In-memory uint8 pixels as a `DataSource` (for the ℓ∞ probe)."""

    def __init__(self, pixels: np.ndarray, description: str) -> None:
        self.pixels = pixels
        self.description = description

    def __len__(self) -> int:
        return len(self.pixels)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(0, len(self.pixels), batch_size):
            yield Batch(pixels=self.pixels[i:i + batch_size])


def read_pool(source: DataSource, limit: int) -> np.ndarray:
    """Up to `limit` calibration images, spread evenly over the source when it is larger.

    Evenly, not the first `limit`: an ImageFolder-style tree lists its files class by class, and a
    pool drawn from the first classes only would make every other class look easy to reach.
    """
    if not source.has_pixels:
        raise CalibrationDataError(
            "trigger synthesis needs pixel calibration data (images or uint8 arrays), not preprocessed "
            "float arrays", hint="give a folder of images or a uint8 .npy/.npz")
    if len(source) > limit:
        keep = np.linspace(0, len(source) - 1, limit).round().astype(int)
        if isinstance(source, ImageFolder):
            sub = copy.copy(source)
            sub.files = [source.files[i] for i in keep]
            sub.labels = None if source.labels is None else [source.labels[i] for i in keep]
            source = sub
        elif isinstance(source, ArraySource):
            sub = copy.copy(source)
            sub.x = source.x[keep]
            sub.y = None if source.y is None else source.y[keep]
            source = sub
    chunks, n = [], 0
    gen = source.batches(min(64, limit))
    try:
        for batch in gen:
            if batch.pixels is None:
                raise CalibrationDataError("trigger synthesis needs pixel calibration data")
            chunks.append(batch.pixels[:limit - n])
            n += len(chunks[-1])
            if n >= limit:
                break
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()
    if n < 2:
        raise CalibrationDataError(f"trigger synthesis needs at least 2 calibration images, got {n}")
    return np.concatenate(chunks)


def static_classes(output_shape: Sequence) -> int | None:
    """Number of classes from the output's static last dimension, if any."""
    last = output_shape[-1] if output_shape else None
    return last if isinstance(last, int) and last > 0 else None
