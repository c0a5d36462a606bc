"""Non-finite statistics: channels whose activations are NaN or infinite on the calibration images.

A NaN weight (or an overflow) makes every statistic of the channels it reaches NaN, and rankings
silently push NaN to one end: the finite channels are then ranked as usual and the report reads
like a normal one. These helpers find such channels so that scan reports them loudly (verdict
``invalid``) and the rewrite commands refuse.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import UnsupportedModelError
from ..measure.stats import ChannelStats


def non_finite_channels(stats: Mapping[str, ChannelStats]) -> dict[str, list[int]]:
    """Tap name -> sorted channels with a NaN or infinite statistic (taps without any left out)."""
    out: dict[str, list[int]] = {}
    for tap, s in stats.items():
        bad = np.zeros(s.channels, dtype=bool)
        for m in s.moments.values():
            if m.count:
                bad |= ~np.isfinite(m.mean) | ~np.isfinite(m.max) | ~np.isfinite(m.min)
        for extreme in (s.chan_max, s.chan_min, s.pos_max, s.pos_min):
            if extreme is not None and s.count:
                values = np.asarray(extreme, dtype=np.float64).reshape(s.channels, -1)
                bad |= (~np.isfinite(values)).any(axis=1)
        if bad.any():
            out[tap] = np.flatnonzero(bad).tolist()
    return out


def describe_non_finite(bad: Mapping[str, list[int]], limit: int = 3) -> str:
    """One line: how many channels of how many maps, naming the first maps and channels."""
    total = sum(len(c) for c in bad.values())
    parts = [f"{tap} channel{'s' if len(c) > 1 else ''} {', '.join(map(str, c[:8]))}{' ...' if len(c) > 8 else ''}"
             for tap, c in list(bad.items())[:limit]]
    more = f"; {len(bad) - limit} more maps" if len(bad) > limit else ""
    return (f"{total} channel{'s' if total > 1 else ''} of {len(bad)} map{'s' if len(bad) > 1 else ''} have non-finite "
            f"statistics (NaN or inf) on the calibration images: {'; '.join(parts)}{more}")


def require_finite(stats: Mapping[str, ChannelStats], command: str) -> None:
    """Refuse to rewrite a model whose activations are not finite.

    Raises:
        UnsupportedModelError: some channel has a NaN or infinite statistic.
    """
    bad = non_finite_channels(stats)
    if bad:
        raise UnsupportedModelError(f"{command} refused: {describe_non_finite(bad)}",
                                    hint="look for NaN or inf weights in the model (onnx-linf scan reports them)")
