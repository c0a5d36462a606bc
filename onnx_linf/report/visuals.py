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
class Visuals:
    """What the pictures of a report need beyond its JSON form."""

    triggers: tuple[TriggerImage, ...] = ()
    """Synthesized triggers, in class order."""
    bounds: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict, repr=False)
    """Clamp: tap -> (upper bound, lower bound or None), ``[C, H, W]`` or ``[C, 1, 1]``."""

    @classmethod
    def of_triggers(cls, triggers) -> Visuals:
        """From `decide.synthesis.results.ClassTrigger` objects."""
        return cls(triggers=tuple(TriggerImage(t.target, t.pattern, t.mask) for t in triggers))
