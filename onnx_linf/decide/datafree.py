"""Data-free evidence: model-level statistics from weights (CLP) and from the margin probe, and their verdict.

Pure numpy. Two checks, each with its statistic and threshold:

* **CLP outlier** (weights only): per convolution, the robust z-score (median / MAD) of every output
  channel's upper bound of channel Lipschitz constant (`flag.clp_scores`); the statistic is the
  largest over all layers. A backdoor is often carried by a few channels with an extreme Lipschitz
  bound (Zheng et al., CLP, ECCV 2022). It names no target class.
* **Margin ratio** (forward passes from noise, `measure.margin`): the largest per-class maximum
  logit margin over the runner-up's. A target class reachable from any input through a small
  pattern gets a margin several times every other class's (MM-BD, Wang et al. 2024).

Thresholds were chosen on the digits fixtures and the CIFAR VGG models of `benchmarks/` (see the
README, "Data-free scan"): CLP 9.0 (clean models at most 7.5; BadNets and Blended VGGs 10.2 and
11.8), margin ratio 2.5 (clean models at most 1.30 over seeds 0-2; Blended targets 4.0 and above, and
3.5 on the held-out ResNet-8; BadNets and SIG targets stay below 1.9, which this check cannot separate).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

#: Robust z (0.6745 (x - median) / MAD) of one channel's CLP score above which a model is suspected.
CLP_THRESHOLD = 9.0
#: Largest maximum margin over the second largest above which the top class is a suspected target.
MARGIN_THRESHOLD = 2.5
#: The runner-up's margin is floored at this share of the top one, so that a model where no other
#: class reaches a positive margin gives a large finite ratio (1 / 0.01 = 100), not a division by zero.
RUNNER_UP_FLOOR = 0.01


@dataclass(frozen=True)
class ClpCheck:
    """The CLP check: the most extreme channel Lipschitz bound of the model, as a robust z-score."""

    statistic: float
    """Largest per-layer robust z-score of a channel's CLP score (0 when no layer could be scored)."""
    threshold: float
    """Suspected above this."""
    layer: str | None
    """Tap of the most extreme channel."""
    channel: int | None
    """Its channel index."""
    per_layer: dict[str, float]
    """Tap -> largest robust z-score in it."""
    layers_scored: int
    """Convolutions whose weights could be read (merge maps and computed weights cannot)."""

    @property
    def suspected(self) -> bool:
        """Whether the statistic exceeds the threshold."""
        return self.statistic > self.threshold

    def to_dict(self) -> dict:
        """Report form."""
        return {"check": "clp", "statistic": self.statistic, "threshold": self.threshold,
                "suspected": self.suspected, "layer": self.layer, "channel": self.channel,
                "per_layer": self.per_layer, "layers_scored": self.layers_scored, "queries": 0}


@dataclass(frozen=True)
class MarginCheck:
    """The margin check: how far the largest per-class maximum margin stands above the runner-up."""

    statistic: float
    """Top class's maximum margin over the runner-up's (floored, see `RUNNER_UP_FLOOR`); 0 when no
    class reached a positive margin."""
    threshold: float
    """Suspected above this."""
    top_class: int
    """Class with the largest maximum margin (the suspected target when the check fires)."""
    margins: dict[int, float]
    """Class -> largest margin found."""
    noise_margins: dict[int, float]
    """Class -> largest margin over the uniform-noise pool, before the search."""
    not_examined: tuple[int, ...]
    """Classes the pre-selection left out."""
    queries: int
    """Image forwards spent."""
    seconds: float
    """Wall-clock seconds."""
    complete: bool
    """False when the time limit cut the search short."""
    extra: dict = field(default_factory=dict)
    """Search details (steps, chains) for the report."""

    @property
    def suspected(self) -> bool:
        """Whether the statistic exceeds the threshold."""
        return self.statistic > self.threshold

    def to_dict(self) -> dict:
        """Report form."""
        return {"check": "margin", "statistic": self.statistic, "threshold": self.threshold,
                "suspected": self.suspected, "top_class": self.top_class,
                "margins": {str(k): v for k, v in self.margins.items()},
                "noise_margins": {str(k): v for k, v in self.noise_margins.items()},
                "not_examined": list(self.not_examined), "queries": self.queries,
                "seconds": round(self.seconds, 3), "complete": self.complete, **self.extra}


def clp_check(scores: Mapping[str, np.ndarray], threshold: float = CLP_THRESHOLD) -> ClpCheck:
    """Model-level CLP statistic from per-layer channel scores (`flag.clp_scores`).

    Args:
        scores: tap name -> CLP score per channel.
        threshold: robust z-score above which the model is suspected.

    Returns:
        The check, with the most extreme channel.
    """
    per_layer: dict[str, float] = {}
    best, where = 0.0, (None, None)
    for tap, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        if s.size < 3:
            continue
        med = float(np.median(s))
        mad = float(np.median(np.abs(s - med)))
        if mad == 0.0:
            continue  # a layer of identical channels has no outlier to speak of
        z = 0.6745 * (s - med) / mad
        k = int(np.argmax(z))
        per_layer[tap] = float(z[k])
        if z[k] > best:
            best, where = float(z[k]), (tap, k)
    return ClpCheck(statistic=best, threshold=threshold, layer=where[0], channel=where[1], per_layer=per_layer,
                    layers_scored=len(per_layer))


def margin_ratio(margins: np.ndarray) -> tuple[float, int]:
    """(top margin / runner-up margin, index of the top) over per-class maximum margins.

    The runner-up is floored at `RUNNER_UP_FLOOR` times the top, so the ratio is at most 100; a
    top margin <= 0 (no class reachable) gives 0.

    Raises:
        ValueError: fewer than 2 margins, or non-finite ones.
    """
    m = np.asarray(margins, dtype=np.float64)
    if m.ndim != 1 or m.size < 2:
        raise ValueError(f"need at least 2 margins, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("margins must be finite")
    order = np.argsort(-m, kind="stable")
    top, second = m[order[0]], m[order[1]]
    if top <= 0:
        return 0.0, int(order[0])
    return float(top / max(second, RUNNER_UP_FLOOR * top)), int(order[0])


@dataclass(frozen=True)
class DataFreeVerdict:
    """The data-free verdict: ``suspected`` when any check fires, else ``clean``."""

    verdict: str
    """``suspected`` or ``clean``."""
    reason: str
    """One sentence, saying it is data-free."""
    target: int | None
    """Suspected target class (from the margin check), None when unknown."""
    checks: tuple
    """The `ClpCheck` and `MarginCheck` that were run."""
    not_checked: tuple[str, ...]
    """What a data-free scan cannot check."""

    def to_dict(self) -> dict:
        """Report form."""
        return {"verdict": self.verdict, "reason": self.reason, "target": self.target,
                "checks": [c.to_dict() for c in self.checks], "not_checked": list(self.not_checked),
                "queries": sum(c.to_dict()["queries"] for c in self.checks)}


#: What the data-free checks cannot see (stated in every data-free report).
NOT_CHECKED = (
    "trigger synthesis on clean images (the patch search of --synthesize needs calibration data)",
    "backdoors whose target's margin is not unusually large from noise inputs: on the benchmark models "
    "BadNets and SIG targets were not separated",
    "per-channel activation statistics (ℓ∞, ℓ1) and the clamp's bounds, which need clean images",
)


def datafree_verdict(clp: ClpCheck, margin: MarginCheck | None) -> DataFreeVerdict:
    """Combine the checks: suspected when either fires (the margin check names the target)."""
    checks = (clp,) if margin is None else (clp, margin)
    fired = []
    if margin is not None and margin.suspected:
        fired.append(f"class {margin.top_class}'s maximum logit margin from noise inputs is "
                     f"{margin.statistic:.1f}x the runner-up's (> {margin.threshold:g})")
    if clp.suspected:
        fired.append(f"channel {clp.channel} of {clp.layer} has an extreme Lipschitz bound (CLP robust z "
                     f"{clp.statistic:.1f} > {clp.threshold:g})")
    target = margin.top_class if margin is not None and margin.suspected else None
    if fired:
        return DataFreeVerdict("suspected", "data-free: " + "; ".join(fired), target, checks, NOT_CHECKED)
    parts = [f"CLP robust z {clp.statistic:.1f} <= {clp.threshold:g}"]
    if margin is not None:
        parts.append(f"margin ratio {margin.statistic:.2f} <= {margin.threshold:g}")
    return DataFreeVerdict("clean", "data-free: nothing suspicious from weights and noise inputs ("
                           + ", ".join(parts) + "); weaker than a scan with data: add --calib", None, checks,
                           NOT_CHECKED)
