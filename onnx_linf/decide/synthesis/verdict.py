"""Neural Cleanse's anomaly index over per-class mask norms, and the suspected classes."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


#: 1.4826 * MAD estimates the standard deviation of normally distributed norms (Neural Cleanse).
MAD_CONSISTENCY = 1.4826

#: Largest norm-to-median ratio that can still be suspected at the default log threshold 3.5.
#: Measured: backdoor targets sit far below it (the BadNets digits trigger is 8.2 against a median
#: near 33, a ratio of 0.25; the README's targets are "tens of times smaller"), while a clean CIFAR
#: VGG's easiest class had mask L1 101 against 134-146 for seven classes: a ratio of 0.72 that a
#: tight cluster (MAD 0.03 in log units) turned into index 5.4.
MAX_SUSPECT_RATIO = 0.5
#: The MAD floor that enforces `MAX_SUSPECT_RATIO`: log units for the log scale, a share of the
#: median for the linear one. A class needs ``(median - v) > 3.5 * 1.4826 * floor`` to pass 3.5, so
#: with ``floor = ln(1 / 0.5) / (3.5 * 1.4826) = 0.134`` only norms below half the median can. It also
#: replaces a MAD of 0 (most classes censored at the image area) by a finite, meaningful spread.
MAD_FLOOR_LOG = float(np.log(1.0 / MAX_SUSPECT_RATIO) / (3.5 * MAD_CONSISTENCY))
MAD_FLOOR_LINEAR = (1.0 - MAX_SUSPECT_RATIO) / (3.5 * MAD_CONSISTENCY)


def anomaly_index(norms: np.ndarray, scale: str = "log", found: np.ndarray | None = None,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """Neural Cleanse's anomaly index of per-class trigger norms, signed towards small norms.

    ``(median - v) / (1.4826 * MAD)`` of v = log(norm) (``scale="log"``, the default) or v = norm
    (``"linear"``, Neural Cleanse's form): positive for norms below the median. A class is a
    suspected target when this exceeds the threshold (`SynthConfig.threshold`: 3.5 on the log scale).

    The MAD is floored (`MAD_FLOOR_LOG`: 0.134 log units; `MAD_FLOOR_LINEAR`: 0.096 of the median on
    the linear scale), so that at the default threshold only a norm below half the median
    (`MAX_SUSPECT_RATIO`) can be suspected. Without the floor, a tight cluster of natural norms makes
    the MAD tiny and a 0.7x class looks anomalous (a clean CIFAR VGG: 101 against 134-146, index 5.4),
    and when more than half of the values are equal (censored classes) the MAD is 0.

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

    With `weights` (a pre-selected subset of classes, see `preselect.baseline_weights`), the median
    and MAD are weighted: a class searched as a random reference stands for the classes it was drawn
    from, so the baseline is that of all classes, not of the easiest ones the pre-selection picked.

    Args:
        norms: per-class norms, 1-D (positive for the log scale; zeros are floored at 1e-12).
        scale: ``log`` or ``linear``.
        found: per class, whether its norm is a measurement (None: all are).
        weights: per class, its positive weight in the median and MAD (None: all equal).

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
    if weights is not None and (np.shape(weights) != x.shape or not np.all(np.asarray(weights) > 0)):
        raise ValueError(f"weights must be positive with the shape of norms {x.shape}")
    if x.size < 3:
        return np.zeros_like(x)
    if scale == "log":
        x = np.log(np.maximum(x, 1e-12))
    keep = np.ones(x.shape, bool) if found is None or int(np.sum(found)) < 3 else np.asarray(found, dtype=bool)
    measured = x[keep]
    if weights is None:
        med = float(np.median(measured))
        mad = float(np.median(np.abs(measured - med)))
    else:
        w = np.asarray(weights, dtype=np.float64)[keep]
        med = weighted_median(measured, w)
        mad = weighted_median(np.abs(measured - med), w)
    floor = MAD_FLOOR_LOG if scale == "log" else MAD_FLOOR_LINEAR * max(abs(med), 1e-12)
    mad = max(mad, floor)
    return (med - x) / (MAD_CONSISTENCY * mad)


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value where the cumulative weight reaches half the total (the mean of the two values
    around it on an exact tie), so that equal weights give `np.median`."""
    order = np.argsort(values, kind="stable")
    v, cum = np.asarray(values, dtype=np.float64)[order], np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    half = cum[-1] / 2.0
    i = int(np.searchsorted(cum, half - 1e-12 * cum[-1]))
    if abs(cum[i] - half) <= 1e-12 * cum[-1] and i + 1 < len(v):
        return float((v[i] + v[i + 1]) / 2.0)
    return float(v[i])


def suspected_classes(classes: Sequence[int], index: np.ndarray, threshold: float) -> tuple[int, ...]:
    """Classes whose (signed) anomaly index exceeds `threshold`, most anomalous first."""
    order = np.argsort(-np.asarray(index), kind="stable")
    return tuple(int(classes[i]) for i in order if index[i] > threshold)
