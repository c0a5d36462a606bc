"""Automatic strength of the channel-mean bound, from clean calibration data only (pure numpy).

The strength is the quantile q (percent) of clean per-image channel means that becomes the bound.
Lower q removes more of a full-image trigger and changes more clean predictions. Each candidate q
is judged by cross-fitting (`commands.crossfit`): bounds fitted on all folds but one, the held-out
fold's predictions compared with the original model's. A rule then picks the lowest q whose cost
on held-out clean images stays within a slack of the cost at q = 100 (the position clamp alone,
fitted the same way, already changes a few held-out predictions: an absolute budget would judge
the position clamp rather than the strength).

Costs a rule can use, per candidate q, over the held-out images:

* ``change``: the share whose top-1 class changed;
* ``softmax``: the estimated accuracy drop ``mean(P[i, orig_i] - P[i, new_i])`` with ``P`` the
  original model's softmax. On a calibrated model that is the expected accuracy lost; it weighs
  a changed confident prediction more than a changed coin flip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError

RULES = ("softmax", "change")

#: Candidate strengths, strongest last.
DEFAULT_GRID = (100.0, 99.5, 99.0, 98.0, 97.0, 95.0, 90.0)


@dataclass(frozen=True)
class StrengthRow:
    """Held-out cost of one candidate strength."""

    quantile: float
    """Candidate q (percent)."""
    changed: float
    """Share of held-out images whose top-1 class changed."""
    estimated_drop: float
    """Estimated accuracy drop (softmax rule's cost), as a fraction."""
    score_p99: float
    """99th percentile of the held-out images' anomaly score (the 1% false-alarm threshold), the
    score's parts divided by `score_scales`."""
    score_scales: tuple[float, ...] = ()
    """Per score part, its held-out 99th percentile (at least `SCORE_SCALE_FLOOR`): the part's scale
    in the deployed score. Empty without parts."""
    held_out_scores: tuple[float, ...] = field(default=(), repr=False)
    """Every held-out image's score (for thresholds at other false-alarm rates); not reported."""
    held_out_mean_scores: tuple[float, ...] = field(default=(), repr=False)
    """Per held-out image, the sum of its scaled channel-mean parts over the maps (the evidence the
    score gate reads); not reported."""
    held_out_low_scores: tuple[float, ...] = field(default=(), repr=False)
    """The same for the low parts (channel means below the clean minimum); empty without them."""


@dataclass(frozen=True)
class StrengthChoice:
    """The chosen strength and everything it was chosen from."""

    quantile: float
    """The chosen q."""
    rule: str
    """``softmax`` or ``change``."""
    slack: float
    """Allowed cost above the cost at q = 100, as a fraction."""
    rows: tuple[StrengthRow, ...]
    """Per candidate, in grid order."""


#: Smallest scale of a score part: a part that (almost) never leaves its bounds on held-out clean
#: images would otherwise get a scale near 0 and turn any tiny excess into a huge score. Parts are
#: log-ratios and relative excesses, so 0.05 is a 5% excess; measured, any floor from 0.001 to 0.1
#: gave the same detection on the benchmark models (clean held-out 99th percentiles are 0.07-0.3).
SCORE_SCALE_FLOOR = 0.05


def part_scales(parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per part (column of `parts` ``[N, P]``) its 99th percentile over the images, floored at
    `SCORE_SCALE_FLOOR`; and every image's score: the largest part divided by its scale."""
    parts = np.asarray(parts, dtype=np.float64).reshape(len(parts), -1)
    finite = np.where(np.isfinite(parts), parts, 0.0)
    if len(parts) == 0:
        return np.full(parts.shape[1], SCORE_SCALE_FLOOR), np.zeros(0)
    scales = np.maximum(np.quantile(finite, 0.99, axis=0, method="inverted_cdf"), SCORE_SCALE_FLOOR)
    return scales, (parts / scales).max(axis=1, initial=0.0)


def held_out_row(quantile: float, probabilities: np.ndarray, original: np.ndarray, new: np.ndarray,
                 parts: np.ndarray, mean_parts: np.ndarray | None = None,
                 low_parts: np.ndarray | None = None) -> StrengthRow:
    """Costs of one candidate from held-out predictions (every image held out exactly once), and
    the score's part scales and 1% threshold from the held-out score parts ``[N, P]``
    (`mean_parts`, `low_parts`: which columns are channel-mean parts, above and below)."""
    rows = np.arange(len(original))
    drop = probabilities[rows, original] - probabilities[rows, new]
    scales, scores = part_scales(parts)

    def summed(columns: np.ndarray | None) -> tuple[float, ...]:
        if columns is None or not np.any(columns):
            return ()
        scaled = np.asarray(parts, dtype=np.float64).reshape(len(parts), -1)[:, columns] / scales[columns]
        return tuple(float(v) for v in scaled.sum(axis=1))
    finite = scores[np.isfinite(scores)]
    p99 = float(np.quantile(finite, 0.99, method="inverted_cdf")) if len(finite) else float("nan")
    return StrengthRow(quantile, float((new != original).mean()), float(drop.mean()), p99,
                       tuple(float(v) for v in scales), tuple(float(v) for v in scores), summed(mean_parts),
                       summed(low_parts))


#: Confidence with which the score gate's threshold keeps the alarm rate on new clean images at or
#: below `ClampConfig.gate_alarm` (`gate_threshold`).
GATE_CONFIDENCE = 0.95


def tolerance_rank(images: int, alarm: float, confidence: float = GATE_CONFIDENCE) -> tuple[int, float]:
    """Which largest held-out score to put the gate threshold at, and the confidence it gives.

    With the threshold at the k-th largest of n held-out clean scores, the share p of new clean
    images above it satisfies P(p > alarm) = P(Binomial(n, alarm) <= k - 1), whatever the score's
    distribution (a one-sided distribution-free tolerance bound). Returns the largest k whose
    probability is at most ``1 - confidence``, and the confidence reached; when even the largest
    score (k = 1) falls short (too few images: n = 1000 at alarm 0.003 reaches 0.95, n = 500 only
    0.78), k = 1 with the lower confidence.
    """
    if images < 1 or not 0 < alarm < 1:
        raise ValueError(f"need images >= 1 and 0 < alarm < 1, got {images} and {alarm}")
    pmf = (1.0 - alarm) ** images  # P(Binomial = 0)
    cdf, k = pmf, 1
    while k < images:
        pmf *= (images - (k - 1)) / k * alarm / (1.0 - alarm)  # P(Binomial = k)
        if cdf + pmf > 1.0 - confidence:
            break
        cdf += pmf
        k += 1
    return k, 1.0 - cdf


def gate_threshold(row: StrengthRow, alarm: float, confidence: float = GATE_CONFIDENCE) -> tuple[float, float]:
    """The channel-mean score (what the score gate reads) to gate above, and its confidence: the
    `tolerance_rank`-th largest held-out clean score of `row`, so that at most a share `alarm` of
    new clean images exceed it with probability `confidence`. NaN without held-out scores.

    Why not the held-out ``1 - alarm`` quantile: from 1,000 images the 99.7th percentile is the
    fourth largest score, and the tail it sits in moves between calibration sets. Measured on a
    clean CIFAR VGG: that threshold let the gate fire on 1.2% of test images (4x the nominal 0.3%),
    and a gated clean image nearly always changes class (36 of 36; 0.9 pt of accuracy lost).
    """
    scores = np.asarray(row.held_out_mean_scores, dtype=np.float64)
    scores = np.sort(scores[np.isfinite(scores)])
    if not len(scores):
        return float("nan"), float("nan")
    k, reached = tolerance_rank(len(scores), alarm, confidence)
    return float(scores[-k]), reached


#: Smallest low-side threshold (scaled units): where no held-out clean image fell below the clean
#: minima at all (every sum 0), float rounding alone must not flag an image.
LOW_THRESHOLD_FLOOR = 1e-3


def low_gate_threshold(row: StrengthRow) -> float | None:
    """The low side's gate threshold: the largest held-out clean sum of scaled low parts, so a new
    clean image passes it with probability 1 / (n + 1) (exchangeability; 0.1% at n = 1,000), on
    top of the upper side's alarm. None without low parts.

    Why the largest, and not a share of the upper side's alarm: on natural images the low evidence
    has a long clean tail (dark or flat photos: every channel mean low), so where it does not
    separate (measured: CIFAR models, threshold 25 against 3.4 for the upper side) it must cost
    nearly nothing; where it does (the digits Blended fixture) triggered images pass even the largest
    clean value. Splitting the alarm instead would have moved the upper side's threshold to its
    largest held-out score too, the power the full-image triggers need.
    """
    scores = np.asarray(row.held_out_low_scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    return max(float(scores.max()), LOW_THRESHOLD_FLOOR) if len(scores) else None


def _cost(rule: str):
    return (lambda r: r.estimated_drop) if rule == "softmax" else (lambda r: r.changed)


def within_budget(row: StrengthRow, reference: StrengthRow, rule: str, slack: float) -> bool:
    """True when `row` costs at most `reference` (the row at q = 100) plus `slack` under `rule`."""
    cost = _cost(rule)
    return cost(row) <= cost(reference) + slack + 1e-12


def exceeded(rows: Sequence[StrengthRow], rule: str, slack: float) -> bool:
    """True when the last candidate costs more than the rule allows: stronger ones are not tried."""
    by_q = {r.quantile: r for r in rows}
    if 100.0 not in by_q or len(rows) < 2:
        return False
    cost = _cost(rule)
    return cost(rows[-1]) > cost(by_q[100.0]) + slack + 1e-12


def choose(rows: Sequence[StrengthRow], rule: str = "softmax", slack: float = 0.01) -> StrengthChoice:
    """The lowest q of the unbroken run of candidates, from q = 100 down, whose cost is at most the
    cost at q = 100 plus `slack`.

    Why an unbroken run: costs grow as q falls, up to noise; a lower q that passes after a higher one
    failed passed by noise, and stopping at the first miss also saves the remaining passes.

    Raises:
        UsageError: unknown rule, negative slack, or no q = 100 row to compare with.
    """
    if rule not in RULES:
        raise UsageError(f"unknown strength rule {rule!r}: use {' or '.join(RULES)}")
    if not 0.0 <= slack < 1.0:
        raise UsageError(f"the strength slack is a fraction in [0, 1), got {slack}")
    by_q: Mapping[float, StrengthRow] = {r.quantile: r for r in rows}
    if 100.0 not in by_q:
        raise UsageError("the strength grid must contain 100 (the reference cost)")
    cost = _cost(rule)
    limit = cost(by_q[100.0]) + slack + 1e-12
    chosen = 100.0
    for r in sorted(rows, key=lambda r: -r.quantile):
        if cost(r) > limit:
            break
        chosen = r.quantile
    return StrengthChoice(chosen, rule, slack, tuple(rows))


def validate_grid(grid: Sequence[float]) -> tuple[float, ...]:
    """Sorted strongest-last, each in (0, 100], 100 included.

    Raises:
        UsageError: an empty grid or a value out of range.
    """
    values = sorted({float(q) for q in grid}, reverse=True)
    if not values or any(not 0.0 < q <= 100.0 for q in values):
        raise UsageError(f"strength grid values must be in (0, 100], got {list(grid)}")
    if values[0] != 100.0:
        values.insert(0, 100.0)
    return tuple(values)
