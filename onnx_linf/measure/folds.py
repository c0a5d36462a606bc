"""Cross-fitting folds over any data source, in one pass.

Image ``i`` (in the source's order) belongs to fold ``i % folds``: interleaved, so a folder sorted
by class spreads every class over every fold, and independent of the batch size, so the folds are
the same whatever batches the source is read in. Batches come out *fold-pure* (every image of a
batch is in the same fold), because statistics that an instrumented graph reduces over the batch
axis (per-position extremes) can then be kept per fold; per fold they merge exactly, so the
statistics of any union of folds are those of one pass over its images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .calibrate import Progress, run_batches
from .preprocess import Preprocess
from .probe import Probe
from .sources import Batch, DataSource
from .stats import ChannelStats, StatsCollector


@dataclass
class FoldBatch(Batch):
    """A batch whose images all belong to one fold."""

    fold: int = 0
    """The fold of every image of the batch."""
    indices: np.ndarray | None = None
    """int64 ``[n]`` position of each image in the underlying source."""


def _take(batch: Batch, rows: np.ndarray) -> Batch:
    pick = (lambda a: None if a is None else a[rows])  # noqa: E731
    return Batch(pixels=pick(batch.pixels), tensor=pick(batch.tensor), labels=pick(batch.labels))


def _concat(parts: Sequence[Batch]) -> Batch:
    cat = (lambda name: None if getattr(parts[0], name) is None  # noqa: E731
           else np.concatenate([getattr(p, name) for p in parts]))
    return Batch(pixels=cat("pixels"), tensor=cat("tensor"), labels=cat("labels"))


class FoldedSource(DataSource):
    """`source` read once, regrouped into fold-pure `FoldBatch`es (optionally of one fold only)."""

    def __init__(self, source: DataSource, folds: int, only: int | None = None) -> None:
        if folds < 1:
            raise UsageError(f"folds must be >= 1, got {folds}")
        if only is not None and not 0 <= only < folds:
            raise UsageError(f"fold {only} does not exist ({folds} folds)")
        self.source, self.folds, self.only = source, folds, only
        self.description = source.description

    def __len__(self) -> int:
        n = len(self.source)
        if self.only is None:
            return n
        return len(range(self.only, n, self.folds))

    @property
    def has_pixels(self) -> bool:
        return self.source.has_pixels

    @property
    def has_labels(self) -> bool:
        return self.source.has_labels

    def batches(self, batch_size: int) -> Iterator[FoldBatch]:
        wanted = range(self.folds) if self.only is None else (self.only,)
        pending: dict[int, list[tuple[Batch, np.ndarray]]] = {f: [] for f in wanted}
        sizes = dict.fromkeys(wanted, 0)
        offset = 0

        def emit(fold: int) -> FoldBatch:
            parts = pending[fold]
            merged = _concat([b for b, _ in parts])
            indices = np.concatenate([i for _, i in parts])
            pending[fold], sizes[fold] = [], 0
            return FoldBatch(pixels=merged.pixels, tensor=merged.tensor, labels=merged.labels, fold=fold,
                             indices=indices)

        for batch in self.source.batches(batch_size):
            index = np.arange(offset, offset + len(batch), dtype=np.int64)
            offset += len(batch)
            for fold in wanted:
                rows = np.flatnonzero(index % self.folds == fold)
                if len(rows) == 0:
                    continue
                pending[fold].append((_take(batch, rows), index[rows]))
                sizes[fold] += len(rows)
                if sizes[fold] >= batch_size:
                    yield emit(fold)
        for fold in wanted:
            if sizes[fold]:
                yield emit(fold)


@dataclass(frozen=True)
class FoldStats:
    """Per-fold statistics of one pass, and the original model's outputs on every image."""

    folds: tuple[dict[str, ChannelStats], ...]
    """One statistics dictionary (tap -> `ChannelStats`) per fold."""
    predictions: np.ndarray
    """int64 ``[N]`` top-1 class of each image (in source order), from the model's first output."""
    probabilities: np.ndarray
    """float32 ``[N, K]`` softmax of the model's first output (K classes; N x K floats in memory)."""

    def merged(self, exclude: int | None = None) -> dict[str, ChannelStats]:
        """Statistics of every fold but `exclude` (all folds when None), merged exactly."""
        keep = [f for i, f in enumerate(self.folds) if i != exclude]
        out = dict(keep[0])
        for stats in keep[1:]:
            out = {tap: out[tap].merge(s) for tap, s in stats.items()}
        return out

    def images(self, exclude: int | None = None) -> int:
        """Images in every fold but `exclude`."""
        n, k = len(self.predictions), len(self.folds)
        return sum(len(range(f, n, k)) for f in range(k) if f != exclude)


def measure_folds(probe: Probe, source: DataSource, preprocess: Preprocess, batch_size: int, folds: int,
                  progress: Progress | None = None, image_topk: int | None = None) -> FoldStats:
    """One pass of `probe` over `source`: statistics per fold, plus the model's own predictions.

    Args:
        image_topk: k kept of per-image statistics (``img_*``) when it differs from the probe's
            per-position k (a channel-mean quantile needs more values than a position maximum).
    """
    channels = {t.name: t.channels for t in probe.taps}
    collectors = [StatsCollector(probe.instrumented.outputs, channels, probe.topk, image_topk=image_topk)
                  for _ in range(folds)]
    logits = probe.instrumented.original_outputs[0]
    names = [logits, *probe.instrumented.output_names()]
    predictions = np.full(len(source), -1, dtype=np.int64)
    probabilities: np.ndarray | None = None
    seen: list[FoldBatch] = []
    note: Callable[[Batch], None] = seen.append
    for values in run_batches(probe.session, FoldedSource(source, folds), preprocess, names, batch_size,
                              progress=progress, batch_level=probe.batch_level, on_batch=note):
        batch = seen.pop()
        collectors[batch.fold].update(values, images=len(batch))
        out = np.asarray(values[logits], dtype=np.float64).reshape(len(batch), -1)
        if probabilities is None:
            probabilities = np.zeros((len(source), out.shape[1]), dtype=np.float32)
        predictions[batch.indices] = out.argmax(-1)
        probabilities[batch.indices] = softmax(out)
    if probabilities is None:
        raise UsageError("no calibration images were read")
    return FoldStats(tuple(c.result() for c in collectors), predictions, probabilities)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
