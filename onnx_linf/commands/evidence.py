"""Trigger evidence for scan, prune and sweep: a given trigger, suspect images, or a synthesized trigger."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from ..decide.flag import Flagged, by_outliers, by_ratio, clean_scores, differential_scores
from ..decide.synthesis.synthesize import synthesize
from ..errors import UsageError
from ..measure.calibrate import Progress
from ..measure.preprocess import Preprocess, Trigger
from ..measure.probe import Probe
from ..measure.sources import DataSource, open_source
from ..measure.stats import ChannelStats
from ..model.load import Model
from .options import ScanConfig


@dataclass(frozen=True)
class Evidence:
    """Trigger evidence: a trigger to stamp, real suspect images, or a trigger to synthesize."""

    trigger: Trigger | str | os.PathLike | None = None
    """Pixel-space trigger (or the path of its PNG) stamped on the calibration images."""
    mask: str | os.PathLike | None = None
    """Path of the trigger's mask PNG (with a trigger path)."""
    suspect: str | os.PathLike | None = None
    """Folder or array file of suspect (triggered) images."""
    synthesize: Any = None
    """A `synthesize.SynthConfig`: search a trigger per class with forward passes only."""
    synthesis: Any = None
    """The `synthesize.SynthResult` once the search ran (set by `resolve_evidence`)."""

    def __post_init__(self) -> None:
        # A resolved synthesis carries its own trigger; otherwise exactly one kind of evidence.
        kinds = (self.suspect is not None, self.synthesize is not None,
                 self.trigger is not None and self.synthesis is None)
        if sum(kinds) != 1:
            raise UsageError("give one kind of evidence: --trigger/--mask, --suspect or --synthesize")
        if self.mask is not None and self.trigger is None:
            raise UsageError("--mask needs --trigger")

    def load_trigger(self, preprocess: Preprocess) -> Trigger | None:
        """The trigger, loaded and checked against the model's input size."""
        if self.trigger is None or isinstance(self.trigger, Trigger):
            return self.trigger
        return Trigger.from_files(self.trigger, self.mask, preprocess)

    def describe(self) -> dict:
        """Report form."""
        if self.synthesize is not None:
            out = {"kind": "synthesized"}
            if self.synthesis is not None:
                out["suspected"] = list(self.synthesis.suspected)
                out["target"] = self.synthesis.suspected[0] if self.synthesis.suspected else None
            return out
        if isinstance(self.trigger, Trigger):
            return {"kind": "trigger", "trigger": self.trigger.description}
        if self.trigger is not None:
            return {"kind": "trigger", "trigger": str(self.trigger),
                    "mask": None if self.mask is None else str(self.mask)}
        return {"kind": "suspect", "path": str(self.suspect)}


def resolve_evidence(model: Model, evidence: Evidence, source: DataSource, preprocess: Preprocess,
                     provider: str, progress: Progress | None = None) -> Evidence:
    """Run trigger synthesis when asked; the result carries the most anomalous class's trigger.

    Returns the evidence unchanged for a given trigger or suspect images. For synthesis, a new
    `Evidence` whose `trigger` is the synthesized trigger of the top suspected class, or None when
    no class is suspected (then there is nothing to rank channels by).
    """
    if evidence.synthesize is None or evidence.synthesis is not None:
        return evidence

    result = synthesize(model, source, preprocess, evidence.synthesize, provider=provider, progress=progress)
    trigger = result.trigger(result.suspected[0]).as_trigger() if result.suspected else None
    return dataclasses.replace(evidence, trigger=trigger, synthesis=result)


def measure_evidence(probe: Probe, evidence: Evidence, calib: DataSource, preprocess: Preprocess,
                     batch_size: int, limit: int | None, progress: Progress | None) -> dict[str, ChannelStats]:
    """Statistics on trigger-stamped calibration images, or on the suspect images."""
    trigger = evidence.load_trigger(preprocess)
    if trigger is not None:
        if not calib.has_pixels:
            raise UsageError("--trigger needs pixel calibration data (images or uint8 arrays), "
                             "not preprocessed float arrays")
        return probe.measure(calib, preprocess, batch_size, trigger, progress)
    suspect = open_source(evidence.suspect, preprocess, limit=limit)
    return probe.measure(suspect, preprocess, batch_size, None, progress)


def score_and_flag(config: ScanConfig, clean: dict[str, ChannelStats],
                   evidence_stats: dict[str, ChannelStats] | None) -> Flagged:
    """Scores (differential when evidence is given, clean otherwise) and the configured policy."""
    if evidence_stats is not None:
        scores = differential_scores(clean, evidence_stats, config.score)
        label = f"differential {config.score}"
    else:
        scores = clean_scores(clean, config.score)
        label = f"clean {config.score}"
    has_evidence = evidence_stats is not None
    if config.policy == "ratio":
        return by_ratio(scores, config.ratio, score=label, evidence=has_evidence)
    return by_outliers(scores, config.threshold, score=label, evidence=has_evidence)


def synthesis_verdict(result: Any) -> tuple[str, str]:
    """Verdict and reason from a `synthesize.SynthResult` (Neural Cleanse's anomaly index)."""
    if result.suspected:
        top = result.suspected[0]
        t = result.trigger(top)
        conc = "" if t.concentration is None else f"; its differential ℓ∞ concentrates {100 * t.concentration:.0f}% " \
            f"in the top {100 * result.config.evidence_ratio:.0f}% channels of the last map"
        return "suspected", (f"class {top} is reached by an unusually small synthesized trigger (mask L1 "
                             f"{t.mask_l1:.1f}, anomaly index {result.anomaly[top]:.1f} > {result.threshold:g}){conc}")
    incomplete = "" if result.complete else " (the query budget or time limit skipped some classes)"
    return "clean", (f"no class's synthesized trigger is anomalously small (max anomaly index "
                     f"{max(result.anomaly.values(), default=0.0):.1f} <= {result.threshold:g}){incomplete}")
