"""Arrays a report carries for its pictures (HTML report) but leaves out of its JSON form.

Images and bound tensors are too large, or too model-specific, for the
machine-readable report, and its JSON is a stable contract (golden-tested). A report keeps them in
one `Visuals` field marked ``json=False`` (see `hidden`), so the HTML writer draws from the report
object alone and never runs anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def hidden():
    """A dataclass field left out of `Report.to_dict` (and of repr and equality)."""
    return field(default=None, repr=False, compare=False, metadata={"json": False})


@dataclass(frozen=True)
class TriggerImage:
    """One synthesized trigger, as the HTML report shows it."""

    target: int
    """Target class."""
    pattern: np.ndarray = field(repr=False)
    """float32 ``[H, W, C]`` pixel values 0..255."""
    mask: np.ndarray = field(repr=False)
    """float32 ``[H, W]`` in [0, 1]."""


@dataclass(frozen=True)
class ChannelHeatmaps:
    """Activation maps of a few channels of one map on the sample images of `Heatmaps`."""

    tap: str
    """Tensor name of the map."""
    why: str
    """Why this map was chosen, e.g. ``last map`` or ``most flagged evidence``."""
    channels: tuple[int, ...]
    """The channels shown, most flagged first."""
    clean: np.ndarray = field(repr=False)
    """float32 ``[images, channels, h, w]`` on the clean sample images."""
    evidence: np.ndarray | None = field(default=None, repr=False)
    """The same on the evidence sample images, when evidence was given."""


@dataclass(frozen=True)
class Heatmaps:
    """Where the chosen channels fire on a few sample images (computed in-graph, no gradients)."""

    clean_pixels: np.ndarray | None = field(repr=False)
    """uint8 ``[images, H, W, C]`` clean sample images (None: the data had no pixels)."""
    maps: tuple[ChannelHeatmaps, ...] = ()
    """Per chosen map."""
    evidence_pixels: np.ndarray | None = field(default=None, repr=False)
    """uint8 ``[images, H, W, C]`` evidence sample images (stamped or suspect)."""
    evidence_label: str | None = None
    """What the evidence images are, e.g. ``trigger-stamped``."""


@dataclass(frozen=True)
class Visuals:
    """What the pictures of a report need beyond its JSON form."""

    triggers: tuple[TriggerImage, ...] = ()
    """Synthesized triggers, in class order."""
    bounds: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict, repr=False)
    """Clamp: tap -> (upper bound, lower bound or None), ``[C, H, W]`` or ``[C, 1, 1]``."""
    heatmaps: Heatmaps | None = None
    """Activation heatmaps of the flagged channels on a few sample images."""

    @classmethod
    def of_triggers(cls, triggers) -> Visuals:
        """From `decide.synthesis.results.ClassTrigger` objects."""
        return cls(triggers=tuple(TriggerImage(t.target, t.pattern, t.mask) for t in triggers))
