"""Neural Cleanse's anomaly index over per-class mask norms, and the suspected classes."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


#: 1.4826 * MAD estimates the standard deviation of normally distributed norms (Neural Cleanse).
MAD_CONSISTENCY = 1.4826


def anomaly_index(norms: np.ndarray, scale: str = "log", found: np.ndarray | None = None) -> np.ndarray:
    """Neural Cleanse's anomaly index of per-class trigger norms, signed towards small norms.

    ``(median - v) / (1.4826 * MAD)`` of v = log(norm) (``scale="log"``, the default) or v = norm
    (``"linear"``, Neural Cleanse's form): positive for norms below the median. A class is a
    suspected target when this exceeds the threshold (`SynthConfig.threshold`: 3.5 on the log scale).
    When more than half of the values are equal the MAD is 0; it is then floored at 1e-3 of the
    median's magnitude (1e-3 in log units) so that the classes that differ get a large, finite index
    instead of a division by zero.

    Why the log scale: mask norms are sizes, and a backdoor shows as a *ratio* (its trigger is tens
    of times smaller than the other classes'), while the other classes' norms spread over a factor
    of two or three, with hard-to-reach classes far above. On the linear scale that upper tail
    inflates the MAD and hides the ratio. Measured with `benchmarks/synth_time.py` on 13 models
    (digits BadNets/Blended/clean x 3 seeds; CIFAR-10 ResNet-8 BadNets/clean, MobileNetV2-style
    BadNets, VGG SIG): targets scored 2.1-5.6 linear but 5.0-11.3 log; the largest index of a
    non-target class was 1.9 linear and 2.7 log. So the log index separates targets from other
    classes by a factor of 1.9 (5.0 / 2.7) where the linear one had 1.1 (2.1 / 1.9), and the 3.5
    threshold sits between them with room on both sides.

    Classes whose search did not reach the ASR (`found` False) carry the image area as their norm:
    a lower bound, not a measurement. When at least three classes were found, the median and MAD
    come from those only. Otherwise, with half the classes at the same area value, the MAD is 0 and
    every class that was found looks anomalous (measured on a MobileNetV2-style Blended model with 6
    of 10 classes not found: four classes over the threshold; from the found ones, only the target).

    Args:
        norms: per-class norms, 1-D (positive for the log scale; zeros are floored at 1e-12).
        scale: ``log`` or ``linear``.
        found: per class, whether its norm is a measurement (None: all are).

    Returns:
        float64 array of the same length (all zeros for fewer than 3 classes: no median to deviate from).

    Raises:
        ValueError: `norms` is not 1-D or holds non-finite values, or `found` has another shape.
    """
    x = np.asarray(norms, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"norms must be 1-D, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("norms must be finite")
    if scale not in ("log", "linear"):
        raise ValueError(f"scale must be log or linear, got {scale!r}")
    if found is not None and np.shape(found) != x.shape:
        raise ValueError(f"found must have the shape of norms {x.shape}, got {np.shape(found)}")
    if x.size < 3:
        return np.zeros_like(x)
    if scale == "log":
        x = np.log(np.maximum(x, 1e-12))
    measured = x if found is None or int(np.sum(found)) < 3 else x[np.asarray(found, dtype=bool)]
    med = float(np.median(measured))
    mad = float(np.median(np.abs(measured - med)))
    if mad == 0.0:
        mad = 1e-3 * max(abs(med), 1.0 if scale == "log" else 1e-12)
    return (med - x) / (MAD_CONSISTENCY * mad)


def suspected_classes(classes: Sequence[int], index: np.ndarray, threshold: float) -> tuple[int, ...]:
    """Classes whose (signed) anomaly index exceeds `threshold`, most anomalous first."""
    order = np.argsort(-np.asarray(index), kind="stable")
    return tuple(int(classes[i]) for i in order if index[i] > threshold)
