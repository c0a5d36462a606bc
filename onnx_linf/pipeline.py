"""Chains the stages for the commands: load -> taps -> instrument -> calibrate -> stats -> flag -> report.

Each public function here is one library call per CLI command; the CLI only parses options,
renders the result and picks the exit code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from .calibrate import Progress, Session, create_session, run_batches
from .data import DataSource, Preprocess, Trigger, open_source
from .errors import UsageError
from .flag import SCORE_STATS, Flagged, by_outliers, by_ratio, clean_scores, differential_scores
from .instrument import CHANNEL_STATS, POSITION_STATS, BATCH_STATS, instrument
from .load import Model, load_model
from .report import ModelInfo, ScanReport, tap_reports
from .stats import ChannelStats, StatsCollector
from .taps import Tap, find_taps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessOptions:
    """User overrides of preprocessing; None = from the model (metadata, input shape) or defaults."""

    size: tuple[int, int] | None = None
    """(H, W) to resize images to."""
    layout: str | None = None
    """``NCHW`` or ``NHWC``."""
    channels: str | None = None
    """``RGB``, ``BGR`` or ``L``."""
    scale: float | None = None
    """Pixel multiplier (default 1/255)."""
    mean: tuple[float, ...] | None = None
    """Per-channel mean (after scaling)."""
    std: tuple[float, ...] | None = None
    """Per-channel std (after scaling)."""

    def resolve(self, model: Model) -> Preprocess:
        """The preprocessing for `model` (see `Preprocess.from_model`)."""
        return Preprocess.from_model(model, size=self.size, layout=self.layout, channels=self.channels,
                                     scale=self.scale, mean=self.mean, std=self.std)


@dataclass(frozen=True)
class ScanConfig:
    """Options of a scan."""

    layers: str | tuple[str, ...] = "all"
    """``all``, ``last`` or explicit tap tensor names."""
    policy: str = "ratio"
    """``ratio`` (top fraction per tap) or ``outliers`` (robust z-score)."""
    ratio: float = 0.1
    """Fraction of channels per tap the ratio policy flags."""
    threshold: float = 3.5
    """Robust z-score threshold of the outliers policy."""
    score: str = "linf"
    """Statistic scores rank by: ``linf``, ``l1`` or ``l2``."""
    stats: tuple[str, ...] = CHANNEL_STATS
    """Per-image statistics to measure."""
    batch_size: int = 32
    """Images per ORT run."""
    provider: str = "auto"
    """``auto``, ``cpu``, ``cuda`` or ``tensorrt``."""
    limit: int | None = None
    """Use at most this many calibration images."""
    preprocess: PreprocessOptions = field(default_factory=PreprocessOptions)
    """Preprocessing overrides."""

    def validate(self) -> None:
        """Raise `UsageError` for inconsistent options."""
        if self.policy not in ("ratio", "outliers"):
            raise UsageError(f"unknown policy {self.policy!r}: use ratio or outliers")
        if not 0.0 < self.ratio < 1.0:
            raise UsageError(f"--ratio must be in (0, 1), got {self.ratio}")
        if self.score not in SCORE_STATS:
            raise UsageError(f"--score must be one of {', '.join(SCORE_STATS)}, got {self.score!r}")
        if self.score not in self.stats:
            raise UsageError(f"--score {self.score} needs that statistic measured (--stats)")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {self.limit}")


class Probe:
    """An instrumented ORT session that measures a fixed set of taps on any data source."""

    def __init__(self, model: Model, taps: Sequence[Tap], stats: Sequence[str] = CHANNEL_STATS,
                 provider: str = "auto", per_tap_stats: dict[str, Sequence[str]] | None = None) -> None:
        self.model = model
        self.taps = list(taps)
        self.instrumented = instrument(model, self.taps, stats, per_tap_stats)
        self.session: Session = create_session(model, self.instrumented.proto, provider)
        self.batch_level = [name for name, ref in self.instrumented.outputs.items()
                            if ref.stat in POSITION_STATS + BATCH_STATS]

    @property
    def provider(self) -> str:
        """The ORT provider that runs."""
        return self.session.provider

    def measure(self, source: DataSource, preprocess: Preprocess, batch_size: int,
                trigger: Trigger | None = None, progress: Progress | None = None) -> dict[str, ChannelStats]:
        """Stream `source` (stamped with `trigger` if given) and aggregate statistics per tap."""
        collector = StatsCollector(self.instrumented.outputs, {t.name: t.channels for t in self.taps})
        names = self.instrumented.output_names()
        for values in run_batches(self.session, source, preprocess, names, batch_size, trigger, progress,
                                  batch_level=self.batch_level):
            collector.update(values)
        return collector.result()


@dataclass(frozen=True)
class Evidence:
    """Trigger evidence: a trigger to stamp on the calibration images, or real suspect images."""

    trigger: Trigger | str | os.PathLike | None = None
    """Pixel-space trigger (or the path of its PNG) stamped on the calibration images."""
    mask: str | os.PathLike | None = None
    """Path of the trigger's mask PNG (with a trigger path)."""
    suspect: str | os.PathLike | None = None
    """Folder or array file of suspect (triggered) images."""

    def __post_init__(self) -> None:
        if (self.trigger is None) == (self.suspect is None):
            raise UsageError("give either a trigger (--trigger/--mask) or suspect images (--suspect), not both")
        if self.mask is not None and self.trigger is None:
            raise UsageError("--mask needs --trigger")

    def load_trigger(self, preprocess: Preprocess) -> Trigger | None:
        """The trigger, loaded and checked against the model's input size."""
        if self.trigger is None or isinstance(self.trigger, Trigger):
            return self.trigger
        return Trigger.from_files(self.trigger, self.mask, preprocess)

    def describe(self) -> dict:
        """Report form."""
        if isinstance(self.trigger, Trigger):
            return {"kind": "trigger", "trigger": self.trigger.description}
        if self.trigger is not None:
            return {"kind": "trigger", "trigger": str(self.trigger),
                    "mask": None if self.mask is None else str(self.mask)}
        return {"kind": "suspect", "path": str(self.suspect)}


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


def scan(model_path: str | os.PathLike | Model, calib: str | os.PathLike | DataSource,
         config: ScanConfig | None = None, *, evidence: Evidence | None = None,
         progress: Progress | None = None) -> ScanReport:
    """Measure per-channel ℓ∞/ℓ1/ℓ2 statistics of a model's activation maps and flag channels.

    Without evidence the flagged channels are merely the most active ones (the report's verdict is
    ``not-assessed``); with a trigger or suspect images they are ranked by differential score.

    Args:
        model_path: the ONNX model (path or loaded `Model`).
        calib: clean calibration data: image folder, ``.npy``/``.npz``, or a `DataSource`.
        config: scan options.
        evidence: optional trigger or suspect images.
        progress: progress sink.

    Returns:
        The scan report.

    Raises:
        LinfError: any user-facing problem (see `onnx_linf.errors`).
    """
    config = config or ScanConfig()
    config.validate()
    model = model_path if isinstance(model_path, Model) else load_model(model_path)
    taps = find_taps(model, config.layers if isinstance(config.layers, str) else list(config.layers))
    preprocess = config.preprocess.resolve(model)
    source = calib if isinstance(calib, DataSource) else open_source(calib, preprocess, limit=config.limit)
    if evidence is not None:
        evidence.load_trigger(preprocess)  # fail on a bad trigger before the long clean pass
    probe = Probe(model, taps, config.stats, config.provider)
    clean = probe.measure(source, preprocess, config.batch_size, progress=progress)
    ev_stats = None
    if evidence is not None:
        ev_stats = measure_evidence(probe, evidence, source, preprocess, config.batch_size, config.limit, progress)
    flagged = score_and_flag(config, clean, ev_stats)
    if evidence is None:
        verdict, reason = "not-assessed", (
            "no trigger evidence: flagged channels are the most active on clean images, which is not "
            "evidence of a backdoor")
    else:
        verdict, reason = "not-assessed", (
            f"channels ranked by {flagged.score}; a differential score shows where the evidence acts, "
            "it does not by itself prove a backdoor")
    return ScanReport(
        model=ModelInfo.of(model),
        provider=probe.provider,
        preprocess=preprocess.to_dict(),
        calibration={"source": source.description, "images": len(source), "batch_size": config.batch_size},
        policy={"name": flagged.policy, "score": flagged.score, "evidence": flagged.evidence,
                "ratio": config.ratio if config.policy == "ratio" else None,
                "threshold": config.threshold if config.policy == "outliers" else None,
                "layers": config.layers if isinstance(config.layers, str) else list(config.layers)},
        taps=tap_reports(taps, clean, flagged, ev_stats),
        verdict=verdict,
        verdict_reason=reason,
        evidence=None if evidence is None else evidence.describe(),
    )
