"""Which channels the HTML report's activation heatmaps show, and measuring them on a few sample images."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ..decide.flag import Flagged
from ..errors import LinfError
from ..measure.channel_maps import sample_maps
from ..measure.preprocess import Preprocess, Trigger
from ..measure.sources import DataSource
from ..measure.stats import ChannelStats
from ..model.load import Model
from ..model.taps import Tap
from ..report.visuals import ChannelHeatmaps, Heatmaps

log = logging.getLogger(__name__)

#: Channels shown per map.
MAX_CHANNELS = 3


def _clean_mean(tap: Tap, clean: dict[str, ChannelStats]) -> np.ndarray:
    """Per-channel mean ℓ∞ on clean images (or the first statistic measured)."""
    moments = clean[tap.name].moments
    return np.asarray((moments["linf"] if "linf" in moments else next(iter(moments.values()))).mean)


def _strength(tap: Tap, flagged: Flagged, clean: dict[str, ChannelStats]) -> float:
    """How strongly a map's flagged channels stand out, scale-free: the top flagged score over the
    map's largest clean mean ℓ∞ (scores are in activation units, which differ from map to map)."""
    tf = flagged.taps.get(tap.name)
    if tf is None or not tf.flagged:
        return -np.inf
    scale = float(np.max(np.abs(_clean_mean(tap, clean)), initial=0.0))
    return float(tf.scores[tf.flagged[0]]) / (scale or 1.0)


def _channels(tap: Tap, flagged: Flagged, clean: dict[str, ChannelStats]) -> tuple[int, ...]:
    """The map's flagged channels, most extreme first; the highest scores when none is flagged."""
    tf = flagged.taps.get(tap.name)
    if tf is not None and tf.flagged:
        return tuple(int(c) for c in tf.flagged[:MAX_CHANNELS])
    scores = np.nan_to_num(np.asarray(tf.scores if tf is not None else _clean_mean(tap, clean)), nan=-np.inf)
    return tuple(int(c) for c in np.argsort(-scores, kind="stable")[:MAX_CHANNELS])


def choose_maps(taps: Sequence[Tap], flagged: Flagged, clean: dict[str, ChannelStats]) -> list[tuple[Tap, str]]:
    """Up to two maps: the last map and, when it is another one, the map whose flagged channels
    stand out most (`_strength`)."""
    if not taps:
        return []
    last = next((t for t in reversed(taps) if t.is_last), taps[-1])
    chosen = [(last, "last map")]
    best = max(taps, key=lambda t: _strength(t, flagged, clean))
    if best.name != last.name and np.isfinite(_strength(best, flagged, clean)):
        label = "most flagged evidence" if flagged.evidence else "most active flagged channels"
        chosen.insert(0, (best, label))
    return chosen


def scan_heatmaps(model: Model, taps: Sequence[Tap], flagged: Flagged, clean: dict[str, ChannelStats],
                  source: DataSource, preprocess: Preprocess, images: int, provider: str = "auto", *,
                  trigger: Trigger | None = None, suspects: DataSource | None = None) -> Heatmaps | None:
    """The chosen maps' channels on the first `images` calibration images and, with evidence, on the
    same images stamped with `trigger` or on the first suspect images.

    A picture is not worth failing a scan for: a model ONNX Runtime cannot run with the added
    Gather outputs gets no heatmaps (logged), and the scan goes on.
    """
    chosen = choose_maps(taps, flagged, clean) if images > 0 else []
    if not chosen:
        return None
    channels = {tap: _channels(tap, flagged, clean) for tap, _ in chosen}
    runs: list[tuple[DataSource, Trigger | None]] = [(source, None)]
    label = None
    if trigger is not None and source.has_pixels:
        runs.append((source, trigger))
        label = "trigger-stamped"
    elif suspects is not None:
        runs.append((suspects, None))
        label = "suspect images"
    try:
        measured = sample_maps(model, channels, runs, preprocess, images, provider)
    except LinfError as exc:
        log.warning("no activation heatmaps: %s", exc)
        return None
    clean_run, evidence_run = measured[0], measured[1] if len(measured) > 1 else None
    maps = tuple(ChannelHeatmaps(tap=tap.name, why=why, channels=channels[tap], clean=clean_run.maps[tap.name],
                                 evidence=None if evidence_run is None else evidence_run.maps[tap.name])
                 for tap, why in chosen)
    return Heatmaps(clean_pixels=clean_run.pixels, maps=maps,
                    evidence_pixels=None if evidence_run is None else evidence_run.pixels, evidence_label=label)
