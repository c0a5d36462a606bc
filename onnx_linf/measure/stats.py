"""Stage 5: streaming, exactly mergeable per-channel aggregates (pure numpy).

`Moments` keeps count, mean, M2 (for the variance), max and min of one statistic per channel.
Two of them merge exactly with the parallel form of Welford's algorithm (Chan et al. 1979), so
shards computed anywhere (batches, threads, processes) combine into the result of a single pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .instrument import BATCH_STATS, CHANNEL_STATS, IMAGE_STATS, POSITION_STATS, RAW, TOPK_STATS, TapOutput


@dataclass
class Moments:
    """Streaming aggregate of one statistic, per channel."""

    count: int
    """Number of images aggregated."""
    mean: np.ndarray
    """float64 ``[C]`` running mean."""
    m2: np.ndarray
    """float64 ``[C]`` sum of squared deviations from the mean."""
    max: np.ndarray
    """float64 ``[C]`` largest value seen."""
    min: np.ndarray
    """float64 ``[C]`` smallest value seen."""

    @classmethod
    def empty(cls, channels: int) -> Moments:
        """An aggregate of zero images."""
        return cls(0, np.zeros(channels), np.zeros(channels),
                   np.full(channels, -np.inf), np.full(channels, np.inf))

    @classmethod
    def of(cls, values: np.ndarray) -> Moments:
        """Aggregate of a batch ``[n, C]``."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2:
            raise ValueError(f"expected [n, C] values, got shape {values.shape}")
        if values.shape[0] == 0:
            return cls.empty(values.shape[1])
        mean = values.mean(axis=0)
        return cls(values.shape[0], mean, ((values - mean) ** 2).sum(axis=0),
                   values.max(axis=0), values.min(axis=0))

    def merge(self, other: Moments) -> Moments:
        """Exact combination of two aggregates (order-independent up to float rounding)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2, np.maximum(self.max, other.max), np.minimum(self.min, other.min))

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per channel (0 when fewer than 2 images)."""
        if self.count < 2:
            return np.zeros_like(self.mean)
        return np.sqrt(np.maximum(self.m2 / self.count, 0.0))


@dataclass
class TopK:
    """The k largest (or smallest) values seen along the image axis, per element: exact and streaming.

    Memory is ``k`` times the element shape, independent of the number of images; the k-th largest
    value is an exact order statistic, so quantiles from it carry no approximation error.
    """

    k: int
    """How many extreme values to keep."""
    largest: bool
    """True: keep the largest values; False: the smallest."""
    values: np.ndarray | None = None
    """``[<=k, ...]`` kept values in "largest" orientation (negated when ``largest`` is False)."""
    count: int = 0
    """Number of images seen."""

    def update(self, batch: np.ndarray, images: int | None = None) -> None:
        """Fold in ``[m, ...]`` candidate values (all values of a batch, or a batch's own top-k)."""
        vals = np.asarray(batch, dtype=np.float64)
        vals = vals if self.largest else -vals
        cat = vals if self.values is None else np.concatenate([self.values, vals])
        if cat.shape[0] > self.k:
            cat = np.partition(cat, cat.shape[0] - self.k, axis=0)[cat.shape[0] - self.k:]
        self.values = cat
        self.count += int(images if images is not None else batch.shape[0])

    def merge(self, other: TopK) -> TopK:
        """Exact combination of two shards."""
        out = TopK(self.k, self.largest, None if self.values is None else self.values.copy(), self.count)
        if other.values is not None:
            out.update(other.values if other.largest else -other.values, images=other.count)
            out.count = self.count + other.count
        return out

    def kth(self, k: int | None = None) -> np.ndarray:
        """The k-th most extreme value per element (default: the `k` kept; the least extreme kept
        value when fewer were seen). A smaller `k` serves a quantile of fewer images, e.g. a subset
        of folds merged: the k-th of the kept top values is the k-th of all values seen."""
        if self.values is None:
            raise ValueError("no values seen")
        if k is None or k >= self.values.shape[0]:
            v = self.values.min(axis=0)
        else:
            if k < 1:
                raise ValueError(f"k must be >= 1, got {k}")
            v = np.partition(self.values, self.values.shape[0] - k, axis=0)[self.values.shape[0] - k]
        return v if self.largest else -v


@dataclass
class ChannelStats:
    """All aggregates of one tap."""

    tap: str
    """Tensor name of the tap."""
    channels: int
    """Number of channels."""
    moments: dict[str, Moments] = field(default_factory=dict)
    """Per-image statistic name (``linf``, ``l1``, ``l2``) -> aggregate over images."""
    pos_max: np.ndarray | None = None
    """``[C, H, W]`` max over images at each position (clamp bounds), if measured."""
    pos_min: np.ndarray | None = None
    """``[C, H, W]`` min over images at each position, if measured."""
    chan_max: np.ndarray | None = None
    """``[C]`` max over images and positions, if measured."""
    chan_min: np.ndarray | None = None
    """``[C]`` min over images and positions, if measured."""
    top: dict[str, TopK] = field(default_factory=dict)
    """Streaming top-k / bottom-k by statistic (``pos_top``, ``pos_bottom``, ``img_max``, ``img_min``)."""
    image_moments: dict[str, Moments] = field(default_factory=dict)
    """Per-image statistic (``img_mean``, ``img_pmean``) -> its moments over images (exact mean of
    the per-image channel means, without keeping them)."""

    @property
    def count(self) -> int:
        """Number of images aggregated."""
        return max((m.count for m in self.moments.values()), default=0)

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Exact combination of two shards of the same tap."""
        if other.tap != self.tap or other.channels != self.channels:
            raise ValueError(f"cannot merge stats of {other.tap} into {self.tap}")
        moments = dict(self.moments)
        for name, m in other.moments.items():
            moments[name] = moments[name].merge(m) if name in moments else m
        top = dict(self.top)
        for name, t in other.top.items():
            top[name] = top[name].merge(t) if name in top else t
        image_moments = dict(self.image_moments)
        for name, m in other.image_moments.items():
            image_moments[name] = image_moments[name].merge(m) if name in image_moments else m
        return ChannelStats(
            self.tap, self.channels, moments,
            _combine(self.pos_max, other.pos_max, np.maximum), _combine(self.pos_min, other.pos_min, np.minimum),
            _combine(self.chan_max, other.chan_max, np.maximum), _combine(self.chan_min, other.chan_min, np.minimum),
            top, image_moments,
        )


def _combine(a: np.ndarray | None, b: np.ndarray | None, op) -> np.ndarray | None:
    if a is None:
        return None if b is None else b.copy()
    if b is None:
        return a
    return op(a, b)


class StatsCollector:
    """Folds per-batch instrumented outputs into one `ChannelStats` per tap."""

    def __init__(self, outputs: Mapping[str, TapOutput], channels: Mapping[str, int], topk: int = 1,
                 image_topk: int | None = None) -> None:
        """
        Args:
            outputs: added output name -> (tap, statistic), from `instrument`.
            channels: tap name -> number of channels.
            topk: k kept by the top-k statistics.
            image_topk: k kept by the per-image statistics (``img_*``), when it differs from `topk`.
        """
        self.topk = topk
        self.image_topk = topk if image_topk is None else image_topk
        self.outputs = dict(outputs)
        self.stats = {tap: ChannelStats(tap, c) for tap, c in channels.items()}

    def update(self, batch: Mapping[str, np.ndarray], images: int | None = None) -> None:
        """Add one batch: ``{output_name: array}`` as returned by the session, for `images` images."""
        for name, value in batch.items():
            ref = self.outputs.get(name)
            if ref is None or ref.stat == RAW:
                continue
            st = self.stats[ref.tap]
            value = np.asarray(value, dtype=np.float64)
            if ref.stat in CHANNEL_STATS:
                m = Moments.of(value)
                st.moments[ref.stat] = st.moments[ref.stat].merge(m) if ref.stat in st.moments else m
            elif ref.stat in TOPK_STATS or ref.stat in IMAGE_STATS:
                largest = ref.stat in ("pos_top", "img_max", "img_mean", "img_pmean")
                k = self.topk if ref.stat in TOPK_STATS else self.image_topk
                acc = st.top.setdefault(ref.stat, TopK(k, largest))
                acc.update(value, images=images if ref.stat in TOPK_STATS else None)
                if ref.stat in ("img_mean", "img_pmean"):
                    m, seen = Moments.of(value), st.image_moments
                    seen[ref.stat] = seen[ref.stat].merge(m) if ref.stat in seen else m
            elif ref.stat in POSITION_STATS or ref.stat in BATCH_STATS:
                attr = ref.stat
                op = np.maximum if attr.endswith("max") else np.minimum
                current = getattr(st, attr)
                setattr(st, attr, value.copy() if current is None else op(current, value))

    def result(self) -> dict[str, ChannelStats]:
        """The aggregates so far, by tap name."""
        return self.stats
