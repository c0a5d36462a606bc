"""Verdicts from the class-count-independent probes (`measure.probes`): one check per family.

Pure numpy. Per class k and probe, the *share* is the fraction of the probed images not predicted as
k on clean input that the probe sends to k. Each family turns its shares into one statistic per
class, and suspects the class with the largest one when it exceeds the family's threshold:

* **noise blend**: the largest share over the blend weights. A network that learnt a blended
  noise trigger sends almost every image to the target when the image is blended with *any* fresh
  uniform noise; on clean models the classes that absorb noise-blended images ("sinks") took at most
  about a quarter of them at these weights.
* **grating bank**: the *orientation-selective share*: the best share over the gratings of one
  orientation (rows, columns, diagonal, antidiagonal; any frequency, phase and amplitude) minus the
  best share of the same class over the gratings of every other orientation, maximised over
  orientations. Raw shares do not separate: on every CIFAR model of the benchmark, clean or not,
  one texture class takes 60-80% of the images under fine diagonal gratings of both diagonal
  orientations, close to a sinusoidal trigger's target. A sinusoidal trigger has one orientation and
  its target is reached by that orientation only; the texture class is reached by both mirror-image
  diagonals (training with horizontal flips makes them equivalent), so its selectivity stays low.

Thresholds were chosen on the digits fixtures and the CIFAR VGG models of `benchmarks/` (clean,
BadNets, Blended, SIG; `benchmarks/verdict.py`, seeds 0-2, the default `ProbeConfig`) and reported on
the others (see the README, "The verdict"), as the middle of each gap rounded to 0.05: noise blend
0.65 (Blended targets 0.97 and above there, every other class at most 0.32); grating selectivity 0.65
(the SIG target 0.83 and above, every other class at most 0.45).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..measure.preprocess import Preprocess
from ..measure.probes import ProbeConfig, ProbeFamily, ProbeRun, ProbeSpec, run_probes
from ..measure.session import Session
from ..model.load import Model

#: Largest noise-blend share above which the class is a suspected target.
NOISE_BLEND_THRESHOLD = 0.65
#: Largest orientation-selective grating share above which the class is a suspected target.
GRATING_THRESHOLD = 0.65
THRESHOLDS = {"noise-blend": NOISE_BLEND_THRESHOLD, "grating": GRATING_THRESHOLD}
ORIENTATIONS = ("rows", "columns", "diagonal", "antidiagonal")

CHECKED = {
    "noise-blend": "each calibration image blended with fresh uniform noise; per class, the share of the "
                   "other classes' images sent to it (largest over the blend weights)",
    "grating": "additive sinusoidal gratings (rows, columns, both diagonals; several frequencies, phases "
               "and amplitudes); per class, the share of the other classes' images its best orientation "
               "sends to it minus the share of its best other orientation",
}


@dataclass(frozen=True)
class ProbeCheck:
    """One probe family's check."""

    family: str
    """``noise-blend`` or ``grating``."""
    statistic: np.ndarray
    """float64 ``[classes]``: the family's statistic per class."""
    threshold: float
    """A class is suspected above this."""
    best_probe: tuple[str, ...]
    """Per class, the probe that sent the most images to it."""
    best_share: np.ndarray
    """float64 ``[classes]``: that probe's share (the raw share, before any normalisation)."""
    queries: int
    """Image forwards of this family (the shared clean pass not included)."""
    seconds: float
    """Wall-clock seconds of this family."""
    images: int
    """Images probed."""
    best_specs: tuple[ProbeSpec, ...] = ()
    """Per class, the probe that sent the most images to it (`best_probe` describes these)."""
    extra: dict = field(default_factory=dict)

    @property
    def top_class(self) -> int:
        """The class with the largest statistic."""
        return int(np.argmax(self.statistic))

    @property
    def suspected(self) -> bool:
        """Whether the largest statistic exceeds the threshold."""
        return bool(self.statistic[self.top_class] > self.threshold)

    @property
    def target(self) -> int | None:
        """The suspected target class, None when the check does not fire."""
        return self.top_class if self.suspected else None

    def top(self, n: int = 3) -> list[dict]:
        """The `n` classes with the largest statistic, largest first."""
        order = np.argsort(-self.statistic, kind="stable")[:n]
        return [{"class": int(k), "statistic": round(float(self.statistic[k]), 4),
                 "best_share": round(float(self.best_share[k]), 4), "best_probe": self.best_probe[k]}
                for k in order]

    def to_dict(self) -> dict:
        """Report form."""
        order = np.argsort(-self.statistic, kind="stable")
        second = float(self.statistic[order[1]]) if len(order) > 1 else 0.0
        return {"family": self.family, "checked": CHECKED[self.family], "statistic": "selective share"
                if self.family == "grating" else "share", "threshold": self.threshold,
                "suspected": self.suspected, "target": self.target, "top_class": self.top_class,
                "top_statistic": round(float(self.statistic[order[0]]), 4),
                "second_statistic": round(second, 4), "top": self.top(),
                "per_class": [round(float(v), 4) for v in self.statistic], "images": self.images,
                "queries": self.queries, "seconds": round(self.seconds, 3), **self.extra}


def family_shares(family: ProbeFamily, run: ProbeRun) -> np.ndarray:
    """``[probes, classes]`` shares of one family (see `ProbeFamily.shares`)."""
    return family.shares(run.clean, run.num_classes)


def noise_blend_statistic(shares: np.ndarray) -> np.ndarray:
    """Per class, the largest share over the noise-blend probes."""
    return np.asarray(shares, dtype=np.float64).max(axis=0)


def selective_statistic(shares: np.ndarray, orientations: list[str]) -> np.ndarray:
    """Per class, the best share over one orientation's probes minus the best over every other
    orientation's, maximised over orientations (0 when only one orientation was probed)."""
    shares = np.asarray(shares, dtype=np.float64)
    names = sorted(set(orientations))
    if len(names) < 2:
        return np.zeros(shares.shape[1])
    best = np.stack([shares[[i for i, o in enumerate(orientations) if o == name]].max(axis=0)
                     for name in names])  # [orientations, classes]
    ordered = np.sort(best, axis=0)
    return ordered[-1] - ordered[-2]


def check_family(family: ProbeFamily, run: ProbeRun, threshold: float | None = None) -> ProbeCheck:
    """The check of one family from its predictions."""
    shares = family_shares(family, run)
    if family.family == "noise-blend":
        stat = noise_blend_statistic(shares)
    else:
        stat = selective_statistic(shares, [p.params["orientation"] for p in family.probes])
    best = shares.argmax(axis=0)
    return ProbeCheck(family=family.family, statistic=stat,
                      threshold=THRESHOLDS[family.family] if threshold is None else threshold,
                      best_probe=tuple(family.probes[i].describe() for i in best),
                      best_share=shares.max(axis=0), queries=family.queries, seconds=family.seconds,
                      images=len(run.clean), best_specs=tuple(family.probes[i] for i in best),
                      extra={"probes": len(family.probes)})


def strongest_suspect(checks: tuple[ProbeCheck, ...]) -> ProbeCheck | None:
    """The check that fired furthest above its threshold (statistic / threshold), None if none fired."""
    fired = [c for c in checks if c.suspected]
    return max(fired, key=lambda c: c.statistic[c.top_class] / c.threshold) if fired else None


def probe_checks(run: ProbeRun, thresholds: dict[str, float] | None = None) -> tuple[ProbeCheck, ...]:
    """One check per family that ran."""
    thresholds = thresholds or {}
    return tuple(check_family(f, run, thresholds.get(f.family)) for f in run.families)


def candidate_scores(run: ProbeRun) -> np.ndarray:
    """Per class, how suspicious the probes find it: the largest statistic over the families, each
    divided by its threshold (above 1: that family suspects the class). For ranking candidate target
    classes before a per-class search; higher is more suspicious."""
    checks = probe_checks(run)
    if not checks:
        return np.zeros(run.num_classes)
    return np.max(np.stack([c.statistic / c.threshold for c in checks]), axis=0)


def probe_candidates(model: Model, preprocess: Preprocess, pixels: np.ndarray, config: ProbeConfig | None = None,
                     provider: str = "auto", session: Session | None = None) -> tuple[np.ndarray, ProbeRun]:
    """Run the probes and score every class as a candidate target (`candidate_scores`).

    The cost is `ProbeConfig.forwards` whatever the number of classes, so a per-class search can be
    kept to the highest-scoring classes. It only ranks classes that full-image perturbations reach:
    a patch backdoor's target scores like any other class.

    Returns:
        float64 ``[classes]`` scores (higher = more suspicious) and the run itself.
    """
    run = run_probes(model, preprocess, pixels, config, provider, session)
    return candidate_scores(run), run


def probes_reason(checks: tuple[ProbeCheck, ...]) -> tuple[list[str], list[str]]:
    """(sentences for the checks that fired, sentences for those that did not)."""
    fired, quiet = [], []
    for c in checks:
        k = c.top_class
        if c.suspected:
            what = "blending with uniform noise" if c.family == "noise-blend" else \
                f"one grating orientation ({c.best_probe[k]})"
            fired.append(f"{what} sends {100 * c.best_share[k]:.0f}% of the other classes' images to class {k} "
                         f"({c.family} statistic {c.statistic[k]:.2f} > {c.threshold:g})")
        else:
            quiet.append(f"{c.family} max {c.statistic[k]:.2f} <= {c.threshold:g}")
    return fired, quiet
