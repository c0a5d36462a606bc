"""How often and how far images leave the clean per-position range of each map (the clamp's view of evidence)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..model.load import Model
from ..model.taps import Tap
from .calibrate import run_batches
from .instrument import (
    instrument_excess,
)
from .preprocess import Preprocess
from .session import create_session
from .sources import DataSource
from .stats import ChannelStats


def bounds_exceedance(model: Model, taps: Sequence[Tap], clean: dict[str, ChannelStats], source: DataSource,
                      preprocess: Preprocess, batch_size: int, provider: str = "auto") -> dict[str, dict]:
    """How often and how far images of `source` leave the clean per-position range of each map.

    Args:
        clean: clean statistics with ``pos_max`` (and ``pos_min``) measured.

    Returns:
        Per tap: images, fraction of images with any element outside the range, mean fraction of
        elements outside, and the mean / max excess relative to the map's largest clean value.
    """

    bounds = {t.name: (clean[t.name].pos_max, None if t.non_negative else clean[t.name].pos_min) for t in taps}
    inst = instrument_excess(model, bounds, {t.name: t.elem_type for t in taps})
    session = create_session(model, inst, provider)
    names = inst.output_names()
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for values in run_batches(session, source, preprocess, names, batch_size):
        for n in names:
            collected[n].append(values[n])
    out: dict[str, dict] = {}
    for n in names:
        ref = inst.outputs[n]
        out.setdefault(ref.tap, {})[ref.stat] = np.concatenate(collected[n])
    summary = {}
    for tap in taps:
        frac, excess = out[tap.name]["excess_frac"], out[tap.name]["excess_max"]
        scale = float(np.max(np.abs(clean[tap.name].pos_max))) or 1.0
        summary[tap.name] = {
            "images": int(len(frac)),
            "images_outside": float((frac > 0).mean()),
            "mean_fraction_outside": float(frac.mean()),
            "mean_relative_excess": float(excess.mean() / scale),
            "max_relative_excess": float(excess.max() / scale),
        }
    return summary
