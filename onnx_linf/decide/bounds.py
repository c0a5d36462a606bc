"""Clamp bounds from clean statistics (pure numpy): the ℓ∞ range clean images produce at each map.

Quantiles are exact order statistics: for N calibration images and quantile q (percent), the upper
bound is the value of rank ``r = ceil(q/100 * N)`` in ascending order — numpy's
``method="inverted_cdf"`` — obtained from a streaming top-k with ``k = N - r + 1`` (see
`stats.TopK`). Memory is k times the map size per tap, independent of how the images are batched;
there is no approximation error. q = 100 gives k = 1, the plain maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..measure.stats import ChannelStats
from ..model.taps import Tap

GRANULARITIES = ("position", "channel")


def topk_for_quantile(quantile: float, images: int) -> int:
    """How many extreme values per element an exact ``quantile`` over ``images`` images needs.

    Raises:
        UsageError: quantile outside (0, 100].
    """
    if not 0.0 < quantile <= 100.0:
        raise UsageError(f"--quantile must be in (0, 100], got {quantile}")
    rank = max(1, math.ceil(quantile / 100.0 * images - 1e-9))
    return images - rank + 1


@dataclass(frozen=True)
class MapBound:
    """Bounds of one map, ready for `rewrite.clamp_maps`."""

    tap: str
    """Tensor name of the map."""
    granularity: str
    """``position`` (per channel x H x W) or ``channel`` (per channel, broadcast over H x W)."""
    hi: np.ndarray
    """float32 upper bound, ``[C, H, W]`` or ``[C, 1, 1]``."""
    lo: np.ndarray | None
    """float32 lower bound of the same shape for maps that go negative, else None."""


def stats_for(granularity: str, two_sided: bool) -> tuple[str, ...]:
    """Instrumented statistics a granularity needs."""
    if granularity == "position":
        return ("pos_top", "pos_bottom") if two_sided else ("pos_top",)
    if granularity == "channel":
        return ("img_max", "img_min") if two_sided else ("img_max",)
    raise UsageError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")


def map_bound(tap: Tap, stats: ChannelStats, granularity: str, margin: float = 0.0, *,
              quantile: float | None = None, images: int | None = None) -> MapBound:
    """Bounds of one map from its streaming top-k statistics.

    Position bounds are the per-element quantile over images. Channel bounds are the quantile
    over images of each image's per-channel maximum (minimum), one value per channel.
    A margin widens the range by ``margin * |bound|`` on each side (headroom for new data).
    With `quantile` and `images` the rank is that of `images` images (statistics merged from a
    subset of cross-fitting folds); otherwise it is the k the statistics were collected with.
    """
    if margin < 0:
        raise UsageError(f"--margin must be >= 0, got {margin}")
    upper, lower = ("pos_top", "pos_bottom") if granularity == "position" else ("img_max", "img_min")
    k = None if quantile is None or images is None else topk_for_quantile(quantile, images)
    hi = stats.top[upper].kth(k)
    lo = stats.top[lower].kth(k) if lower in stats.top else None
    if granularity == "channel":
        hi = hi.reshape(-1, 1, 1)
        lo = None if lo is None else lo.reshape(-1, 1, 1)
    hi = hi + margin * np.abs(hi)
    if lo is not None:
        lo = lo - margin * np.abs(lo)
    return MapBound(tap.name, granularity, hi.astype(np.float32),
                    None if lo is None else lo.astype(np.float32))


#: Relative widening of channel-mean bounds: the rewritten model computes channel means with
#: the same GlobalAveragePool, but ONNX Runtime may run it in another layout (another summation
#: order) there, so a clean image at the bound must never be scaled by a rounding difference.
#: Backdoor excesses are multiples of the bound (measured: 4-23x), so 1e-3 costs nothing.
MEAN_BOUND_SLACK = 1e-3


def mean_bound(stats: ChannelStats, statistic: str, quantile: float, images: int) -> np.ndarray:
    """``[C]`` channel-mean bound: the `quantile` over `images` images of each image's channel mean.

    Args:
        stats: statistics with a top-k of `statistic` (``img_mean`` or ``img_pmean``) per image.
        quantile: percent in (0, 100].
        images: images the statistics hold (a subset of folds: fewer than were measured).
    """
    values = stats.top[statistic].kth(topk_for_quantile(quantile, images))
    return (np.maximum(values, 0.0) * (1.0 + MEAN_BOUND_SLACK)).astype(np.float32)
