"""Chains the stages for the commands: load -> taps -> instrument -> calibrate -> stats -> flag -> report.

Each public function here is one library call per CLI command; the CLI only parses options,
renders the result and picks the exit code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .calibrate import Progress, Session, create_session, model_tensor, run_batches
from .data import DataSource, Preprocess, Trigger, open_source
from .errors import CalibrationDataError, NoEvidenceError, UsageError
from .files import check_output_path, save_model
from .flag import SCORE_STATS, Flagged, by_outliers, by_ratio, clean_scores, differential_scores, from_channels
from .instrument import BATCH_STATS, CHANNEL_STATS, DEFAULT_STATS, POSITION_STATS, TOPK_STATS, instrument
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


#: Trigger success rate above which a pruning ratio chosen by the accuracy budget is reported as
#: not removing the backdoor (the issue's "removed" is ASR <= 10%).
RESIDUAL_ASR = 0.10


@dataclass(frozen=True)
class ScanConfig:
    """Options of a scan."""

    layers: str | tuple[str, ...] = "all"
    """``all``, ``all+branches``, ``last`` or explicit tap tensor names (see `find_taps`)."""
    policy: str = "ratio"
    """``ratio`` (top fraction per tap) or ``outliers`` (robust z-score)."""
    ratio: float = 0.1
    """Fraction of channels per tap the ratio policy flags."""
    threshold: float = 3.5
    """Robust z-score threshold of the outliers policy."""
    score: str = "linf"
    """Statistic scores rank by: ``linf``, ``l1`` or ``l2``."""
    stats: tuple[str, ...] = DEFAULT_STATS
    """Per-image statistics to measure (`score` is always measured too, see `measured_stats`)."""
    batch_size: int | str = 32
    """Images per ORT run, or ``auto`` (scan only: the largest batch that fits, see `auto_batch_size`)."""
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
        unknown = [s for s in self.stats if s not in CHANNEL_STATS]
        if unknown:
            raise UsageError(f"unknown statistic {unknown[0]!r} in --stats: use {', '.join(CHANNEL_STATS)}")
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise UsageError(f"--batch-size must be a positive integer or 'auto', got {self.batch_size!r}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {self.limit}")

    @property
    def measured_stats(self) -> tuple[str, ...]:
        """`stats`, plus the ranking `score` when it is not among them."""
        return self.stats if self.score in self.stats else (*self.stats, self.score)


class Probe:
    """An instrumented ORT session that measures a fixed set of taps on any data source."""

    def __init__(self, model: Model, taps: Sequence[Tap], stats: Sequence[str] = DEFAULT_STATS,
                 provider: str = "auto", per_tap_stats: dict[str, Sequence[str]] | None = None,
                 topk: int = 1) -> None:
        self.model = model
        self.taps = list(taps)
        self.topk = topk
        self.instrumented = instrument(model, self.taps, stats, per_tap_stats, topk=topk)
        self.session: Session = create_session(model, self.instrumented, provider)
        self.batch_level = [name for name, ref in self.instrumented.outputs.items()
                            if ref.stat in POSITION_STATS + BATCH_STATS + TOPK_STATS]

    @property
    def provider(self) -> str:
        """The ORT provider that runs."""
        return self.session.provider

    def measure(self, source: DataSource, preprocess: Preprocess, batch_size: int,
                trigger: Trigger | None = None, progress: Progress | None = None) -> dict[str, ChannelStats]:
        """Stream `source` (stamped with `trigger` if given) and aggregate statistics per tap."""
        collector = StatsCollector(self.instrumented.outputs, {t.name: t.channels for t in self.taps}, self.topk)
        names = self.instrumented.output_names()
        sizes: list[int] = []
        for values in run_batches(self.session, source, preprocess, names, batch_size, trigger, progress,
                                  batch_level=self.batch_level, on_batch=lambda b: sizes.append(len(b))):
            collector.update(values, images=sizes[-1])
        return collector.result()


def open_calibration(model: Model, calib: str | os.PathLike | DataSource, preprocess: Preprocess,
                     limit: int | None) -> DataSource:
    """A calibration source from a path (image folder, arrays, data-loader script) or as given."""
    if isinstance(calib, DataSource):
        return calib
    return open_source(calib, preprocess, limit=limit, input_name=model.input.name)


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
    from .synthesize import synthesize

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
    source = open_calibration(model, calib, preprocess, config.limit)
    if evidence is not None:
        evidence.load_trigger(preprocess)  # fail on a bad trigger before the long clean pass
    if evidence is not None and evidence.synthesize is not None:
        evidence = resolve_evidence(model, evidence, source, preprocess, config.provider, progress)
    suspects = evidence is not None and evidence.suspect is not None
    # With suspect images, also measure the clean per-position range: how far suspects leave it is
    # the clamp's view of the same evidence (a test-time signal that needs no trigger).
    probe = Probe(model, taps, config.measured_stats + (POSITION_STATS if suspects else ()), config.provider)
    batch_note = None
    if config.batch_size == "auto":
        from .calibrate import auto_batch_size

        choice = auto_batch_size(model, probe.provider, taps=probe.taps, images=len(source), size=preprocess.size)
        config = dataclasses.replace(config, batch_size=choice.batch_size)
        batch_note = choice.reason
    clean = probe.measure(source, preprocess, config.batch_size, progress=progress)
    ev_stats = None
    extra: dict = {}
    if model.quantized_ops:
        extra["notes"] = [
            f"quantized model ({', '.join(model.quantized_ops)}): a measured conv output gets a second consumer, "
            "so ONNX Runtime runs that conv on its float path instead of fusing it into an integer kernel; the "
            "statistics approximate the deployed integer arithmetic"]
    if evidence is not None and (evidence.trigger is not None or evidence.suspect is not None):
        ev_stats = measure_evidence(probe, evidence, source, preprocess, config.batch_size, config.limit, progress)
    if suspects:
        suspect_source = open_source(evidence.suspect, preprocess, limit=config.limit)
        extra["bounds_exceedance"] = bounds_exceedance(model, taps, clean, suspect_source, preprocess,
                                                       config.batch_size, config.provider)
    flagged = score_and_flag(config, clean, ev_stats)
    if evidence is not None and evidence.synthesis is not None:
        verdict, reason = synthesis_verdict(evidence.synthesis)
        extra["synthesis"] = evidence.synthesis.to_dict()
    elif evidence is None:
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
        calibration=_calibration_section(source, config.batch_size, batch_note),
        policy=_policy_section(config, flagged, config.layers if isinstance(config.layers, str)
                               else list(config.layers)),
        taps=tap_reports(taps, clean, flagged, ev_stats),
        verdict=verdict,
        verdict_reason=reason,
        evidence=None if evidence is None else evidence.describe(),
        extra=extra,
    )


def _calibration_section(source: DataSource, batch_size: int, batch_note: str | None = None) -> dict:
    """The report's record of the calibration data."""
    out = {"source": source.description, "images": len(source), "batch_size": batch_size}
    if batch_note:
        out["batch_size_reason"] = batch_note
    return out


def _policy_section(config: ScanConfig, flagged: Flagged, layers: str | list[str]) -> dict:
    """The report's record of how channels were ranked and flagged."""
    return {"name": flagged.policy, "score": flagged.score, "evidence": flagged.evidence,
            "ratio": config.ratio if flagged.policy == "ratio" else None,
            "threshold": config.threshold if flagged.policy == "outliers" else None,
            "layers": layers}


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


def bounds_exceedance(model: Model, taps: Sequence[Tap], clean: dict[str, ChannelStats], source: DataSource,
                      preprocess: Preprocess, batch_size: int, provider: str = "auto") -> dict[str, dict]:
    """How often and how far images of `source` leave the clean per-position range of each map.

    Args:
        clean: clean statistics with ``pos_max`` (and ``pos_min``) measured.

    Returns:
        Per tap: images, fraction of images with any element outside the range, mean fraction of
        elements outside, and the mean / max excess relative to the map's largest clean value.
    """
    from .instrument import instrument_excess

    bounds = {t.name: (clean[t.name].pos_max, None if t.non_negative else clean[t.name].pos_min) for t in taps}
    inst = instrument_excess(model, bounds, {t.name: t.elem_type for t in taps})
    session = create_session(model, inst, provider)
    names = inst.output_names()
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for values in run_batches(session, source, preprocess, names, batch_size):
        for n in names:
            collected[n].append(values[n])
    out: dict[str, dict] = {}
    for n in names:
        ref = inst.outputs[n]
        out.setdefault(ref.tap, {})[ref.stat] = np.concatenate(collected[n])
    summary = {}
    for tap in taps:
        frac, excess = out[tap.name]["excess_frac"], out[tap.name]["excess_max"]
        scale = float(np.max(np.abs(clean[tap.name].pos_max))) or 1.0
        summary[tap.name] = {
            "images": int(len(frac)),
            "images_outside": float((frac > 0).mean()),
            "mean_fraction_outside": float(frac.mean()),
            "mean_relative_excess": float(excess.mean() / scale),
            "max_relative_excess": float(excess.max() / scale),
        }
    return summary


# --------------------------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------------------------



@dataclass(frozen=True)
class PruneConfig:
    """Options of a prune."""

    scan: ScanConfig = field(default_factory=lambda: ScanConfig(layers="last"))
    """How channels are measured and ranked (default: the last map, as in the paper)."""
    evidence: str = "required"
    """``required`` (trigger, suspect images or report), or ``none`` (rank by clean activity: study only)."""
    fold: bool = True
    """Fold zeroing into weights where exact (else always insert a mask)."""
    verify_images: int = 256
    """Calibration images the verification compares outputs on."""
    atol: float = 1e-4
    """Absolute tolerance of the numeric verification."""
    rtol: float = 1e-4
    """Relative tolerance of the numeric verification."""
    synthesize: Any = None
    """`synthesize.SynthConfig` used when no evidence is given (default options when None)."""
    max_acc_drop: float | None = None
    """Pick the ratio automatically: lowest trigger ASR with accuracy within this drop (needs labels)."""
    labels: str | os.PathLike | None = None
    """Labelled data for the automatic ratio (default: the calibration data, if labelled)."""
    target: int | None = None
    """Attack target for the automatic ratio's ASR (default: inferred from stamped predictions)."""


@dataclass(frozen=True)
class PruneResult:
    """What `prune` did."""

    report: ScanReport
    """Scan-style report; `extra` holds ``surgery``, ``verification``, ``output`` and ``evaluation``."""
    proto: onnx.ModelProto = field(repr=False)
    """The pruned model (already written when an output path was given)."""


def _load_with_weights(model: Model) -> Model:
    """A copy of the model with external weights loaded, so surgery can read and change them."""
    if not model.has_external_data:
        return model
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    onnx.external_data_helper.load_external_data_for_model(proto, str(model.base_dir))
    return dataclasses.replace(model, proto=proto, has_external_data=False)


def _verify_inputs(source: DataSource, preprocess: Preprocess, batch_size: int, limit: int) -> list[np.ndarray]:
    out, seen = [], 0
    for batch in source.batches(batch_size):
        out.append(model_tensor(batch, preprocess))
        seen += len(batch)
        if seen >= limit:
            break
    return out


def prune(model_path: str | os.PathLike | Model, calib: str | os.PathLike | DataSource,
          config: PruneConfig | None = None, *, evidence: Evidence | None = None,
          from_report: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
          force: bool = False, progress: Progress | None = None) -> PruneResult:
    """Zero the channels most driven by trigger evidence, verify the result, and write it.

    Args:
        model_path: the ONNX model (path or loaded `Model`).
        calib: clean calibration data.
        config: prune options.
        evidence: trigger or suspect images (ranking by differential score).
        from_report: prune exactly the channels a scan report flagged instead.
        output: where to write the pruned model (never the input file).
        force: overwrite an existing output file (never the input).
        progress: progress sink.

    Returns:
        The report and the pruned model.

    Raises:
        UsageError: no evidence (unless ``config.evidence == "none"``), or a bad output path.
        VerificationError: the pruned model differs from the masked reference; nothing is written.
    """
    from .report import load_report
    from .rewrite import check_rewritable, mask_reference, zero_channels
    from .verify import require_ok, verify_model

    config = config or PruneConfig()
    scan_cfg = config.scan
    swept: SweepResult | None = None
    notes: list[str] = []
    scan_cfg.validate()
    if config.evidence not in ("required", "none"):
        raise UsageError(f"--evidence must be 'required' or 'none', got {config.evidence!r}")
    if from_report is not None and evidence is not None:
        raise UsageError("--from-report already fixes the channels; drop --trigger/--suspect")
    if from_report is None and evidence is None and config.evidence == "required":
        # With no evidence given, synthesize a trigger: ranking by clean activity finds nothing.
        from .synthesize import SynthConfig

        evidence = Evidence(synthesize=config.synthesize or SynthConfig())
    model = model_path if isinstance(model_path, Model) else load_model(model_path)
    check_rewritable(model)  # before any calibration pass
    if output is not None:
        check_output_path(output, [model.path], force)
    preprocess = scan_cfg.preprocess.resolve(model)
    source = open_calibration(model, calib, preprocess, scan_cfg.limit)

    if from_report is not None:
        report_in = load_report(from_report)
        if report_in.model.sha256 != model.sha256:
            raise UsageError(f"{from_report} was made for another model (sha256 {report_in.model.sha256[:12]}, "
                             f"this one {model.sha256[:12]})")
        wanted = report_in.flagged_channels()
        if not wanted:
            raise UsageError(f"{from_report} flags no channels: nothing to prune")
        taps = find_taps(model, list(wanted))
        probe = Probe(model, taps, scan_cfg.measured_stats, scan_cfg.provider)
        clean = probe.measure(source, preprocess, scan_cfg.batch_size, progress=progress)
        flagged = from_channels(wanted, policy="report", score=report_in.policy.get("score", "from report"),
                                evidence=bool(report_in.policy.get("evidence")),
                                sizes={t.name: t.channels for t in taps})
        ev_stats = None
    else:
        taps = find_taps(model, scan_cfg.layers if isinstance(scan_cfg.layers, str) else list(scan_cfg.layers))
        if evidence is not None:
            evidence.load_trigger(preprocess)
            evidence = resolve_evidence(model, evidence, source, preprocess, scan_cfg.provider, progress)
            if evidence.synthesis is not None and evidence.trigger is None:
                raise NoEvidenceError(
                    "trigger synthesis suspects no target class: there is no evidence to prune by "
                    f"({synthesis_verdict(evidence.synthesis)[1]})",
                    hint="if you know the trigger, pass --trigger/--mask; the clamp needs no trigger")
        probe = Probe(model, taps, scan_cfg.measured_stats, scan_cfg.provider)
        clean = probe.measure(source, preprocess, scan_cfg.batch_size, progress=progress)
        ev_stats = None
        if evidence is not None:
            ev_stats = measure_evidence(probe, evidence, source, preprocess, scan_cfg.batch_size, scan_cfg.limit,
                                        progress)
        if config.max_acc_drop is not None:
            trigger = evidence.load_trigger(preprocess) if evidence is not None else None
            if trigger is None:
                raise UsageError("--max-acc-drop measures a trigger's success: give --trigger/--mask or --synthesize")
            labelled = source if config.labels is None else open_source(config.labels, preprocess, labelled=True,
                                                                        limit=scan_cfg.limit)
            if not labelled.has_labels:
                raise CalibrationDataError("--max-acc-drop needs labelled data: pass --labels (an .npz with x "
                                           "and y, or a folder with one subfolder per class)")
            swept = sweep(model, taps, clean, ev_stats, labelled, preprocess, trigger, target=config.target,
                          score=scan_cfg.score, max_acc_drop=config.max_acc_drop, provider=scan_cfg.provider,
                          batch_size=scan_cfg.batch_size)
            if swept.chosen is None:
                raise UsageError(f"no pruning ratio keeps the accuracy drop within {config.max_acc_drop:g} "
                                 f"(best: {max(swept.rows, key=lambda r: r.accuracy)})")
            scan_cfg = dataclasses.replace(scan_cfg, ratio=swept.chosen.ratio)
            if swept.chosen.asr > RESIDUAL_ASR:
                notes.append(
                    f"within the accuracy budget the best ratio ({swept.chosen.ratio:g}) leaves the trigger's "
                    f"success rate at {100 * swept.chosen.asr:.0f}% on the labelled images: pruning does not "
                    "remove this backdoor; the clamp (onnx-linf clamp) needs no trigger")
        flagged = score_and_flag(scan_cfg, clean, ev_stats)

    editable = _load_with_weights(model)
    channels = flagged.channels()
    pruned, records = zero_channels(editable, taps, channels, fold=config.fold)
    reference = mask_reference(editable, channels)
    inputs = _verify_inputs(source, preprocess, scan_cfg.batch_size, config.verify_images)
    result = verify_model(editable, pruned, reference, inputs, atol=config.atol, rtol=config.rtol,
                          provider=scan_cfg.provider)
    require_ok(result)
    if output is not None:
        save_model(pruned, output, external_data=model.has_external_data)
        log.info("wrote %s", output)

    report = ScanReport(
        model=ModelInfo.of(model),
        provider=probe.provider,
        preprocess=preprocess.to_dict(),
        calibration=_calibration_section(source, scan_cfg.batch_size),
        policy=dict(_policy_section(scan_cfg, flagged, [t.name for t in taps]),
                    ratio_chosen_by=None if swept is None else f"sweep, max accuracy drop {config.max_acc_drop:g}"),
        taps=tap_reports(taps, clean, flagged, ev_stats),
        verdict="not-assessed",
        verdict_reason=f"pruned {flagged.total} channels ranked by {flagged.score}",
        evidence=(evidence.describe() if evidence is not None
                  else {"kind": "report", "path": str(from_report)} if from_report is not None else None),
        extra={
            "surgery": [dataclasses.asdict(r) for r in records],
            "verification": dataclasses.asdict(result),
            "output": None if output is None else str(output),
            "sweep": None if swept is None else swept.to_dict(),
            "synthesis": None if evidence is None or evidence.synthesis is None else evidence.synthesis.to_dict(),
            "notes": notes,
        },
    )
    return PruneResult(report=report, proto=pruned)


# --------------------------------------------------------------------------------------------
# clamp
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClampConfig:
    """Options of a clamp."""

    layers: str | tuple[str, ...] = "all"
    """Maps to bound: ``all`` (default: clamping only the last map is far weaker), ``last`` or names."""
    granularity: str = "position"
    """``position`` (one bound per channel x H x W) or ``channel`` (one per channel)."""
    quantile: float = 100.0
    """Bound = this quantile (percent) of clean values; 100 = the maximum (identity on calibration data)."""
    margin: float = 0.0
    """Widen every bound by ``margin * |bound|``."""
    batch_size: int = 32
    """Images per ORT run."""
    provider: str = "auto"
    """ORT provider."""
    limit: int | None = None
    """Use at most this many calibration images."""
    preprocess: PreprocessOptions = field(default_factory=PreprocessOptions)
    """Preprocessing overrides."""
    verify_images: int = 256
    """Calibration images the verification runs on."""


@dataclass(frozen=True)
class ClampResult:
    """What `clamp` did."""

    proto: onnx.ModelProto = field(repr=False)
    """The clamped model (already written when an output path was given)."""
    bounds: list = field(repr=False)
    """`bounds.MapBound` per map."""
    records: list
    """`rewrite.ClampRecord` per map."""
    report: dict
    """JSON-ready report."""


def clamp(model_path: str | os.PathLike | Model, calib: str | os.PathLike | DataSource,
          config: ClampConfig | None = None, *, output: str | os.PathLike | None = None, force: bool = False,
          progress: Progress | None = None, preprocess: Preprocess | None = None) -> ClampResult:
    """Bound every activation map to the range clean calibration images produce: ``Min(a, τ)``.

    No trigger, labels or gradients: clean images and forward passes only. Maps that can go
    negative are bounded on both sides (``Max(a, lo)``). Position granularity falls back to channel
    granularity for maps whose spatial size is not static.

    Raises:
        UsageError: bad options or output path.
        VerificationError: at quantile 100 without margin, the clamped model must reproduce the
            original's outputs on the calibration images exactly; otherwise nothing is written.
    """
    from .bounds import map_bound, stats_for, topk_for_quantile
    from .report import ModelInfo
    from .rewrite import ClampBound, check_rewritable, clamp_maps
    from .verify import require_ok, verify_model

    config = config or ClampConfig()
    if config.granularity not in ("position", "channel"):
        raise UsageError(f"--granularity must be position or channel, got {config.granularity!r}")
    if config.margin < 0:
        raise UsageError(f"--margin must be >= 0, got {config.margin}")
    model = model_path if isinstance(model_path, Model) else load_model(model_path)
    check_rewritable(model)  # before any calibration pass
    if output is not None:
        check_output_path(output, [model.path], force)
    taps = find_taps(model, config.layers if isinstance(config.layers, str) else list(config.layers))
    preprocess = preprocess or config.preprocess.resolve(model)
    source = open_calibration(model, calib, preprocess, config.limit)
    k = topk_for_quantile(config.quantile, len(source))

    granularity: dict[str, str] = {}
    notes: list[str] = []
    per_tap: dict[str, tuple[str, ...]] = {}
    for tap in taps:
        g = config.granularity
        if g == "position" and not tap.static_spatial:
            g = "channel"
            notes.append(f"{tap.name}: spatial size is dynamic, bounded per channel")
        granularity[tap.name] = g
        per_tap[tap.name] = stats_for(g, two_sided=not tap.non_negative)
    probe = Probe(model, taps, (), config.provider, per_tap_stats=per_tap, topk=k)
    stats = probe.measure(source, preprocess, config.batch_size, progress=progress)
    bounds = [map_bound(tap, stats[tap.name], granularity[tap.name], config.margin) for tap in taps]

    editable = _load_with_weights(model)
    proto, records = clamp_maps(editable, {b.tap: ClampBound(hi=b.hi, lo=b.lo) for b in bounds})
    inputs = _verify_inputs(source, preprocess, config.batch_size, config.verify_images)
    identity = config.quantile == 100.0 and config.margin == 0.0
    # At q = 100 the clamp is the identity on the images it was fitted on, so the original model is
    # the reference. Below 100 it is not meant to be: the check then covers structure and loading,
    # and the report says how many calibration predictions changed.
    result = verify_model(editable, proto, editable.proto, inputs, atol=1e-5, rtol=1e-5,
                          provider=config.provider, exact=False) if identity else None
    if result is not None:
        require_ok(result)
    agreement = _agreement(editable, proto, inputs, config.provider)
    if output is not None:
        save_model(proto, output, external_data=model.has_external_data)
    report = {
        "schema_version": 1, "tool": "onnx-linf", "command": "clamp",
        "model": dataclasses.asdict(ModelInfo.of(model)), "provider": probe.provider,
        "preprocess": preprocess.to_dict(),
        "calibration": {"source": source.description, "images": len(source), "batch_size": config.batch_size},
        "config": {"layers": config.layers if isinstance(config.layers, str) else list(config.layers),
                   "granularity": config.granularity, "quantile": config.quantile, "margin": config.margin,
                   "topk": k},
        "maps": [{"tap": b.tap, "granularity": b.granularity, "two_sided": b.lo is not None,
                  "elements": int(b.hi.size), "hi_mean": float(b.hi.mean()), "hi_max": float(b.hi.max()),
                  "lo_min": None if b.lo is None else float(b.lo.min())} for b in bounds],
        "notes": notes,
        "verification": None if result is None else dataclasses.asdict(result),
        "calibration_agreement": agreement,
        "output": None if output is None else str(output),
    }
    return ClampResult(proto=proto, bounds=bounds, records=records, report=report)


def _agreement(model: Model, proto: onnx.ModelProto, inputs: list[np.ndarray], provider: str) -> float:
    """Fraction of inputs whose top-1 class is the same for the original and the rewritten model."""
    a, b = create_session(model, None, provider), create_session(model, proto, provider)
    same = total = 0
    for x in inputs:
        pa, pb = a.run(None, x)[0], b.run(None, x)[0]
        same += int((pa.argmax(-1) == pb.argmax(-1)).sum())
        total += len(x)
    return same / total if total else float("nan")


# --------------------------------------------------------------------------------------------
# sweep and automatic ratio
# --------------------------------------------------------------------------------------------

RATIO_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


@dataclass(frozen=True)
class SweepRow:
    """Effect of pruning one ratio."""

    ratio: float
    """Fraction of channels zeroed per map."""
    channels: int
    """Channels zeroed in all."""
    accuracy: float
    """Clean accuracy on the labelled data."""
    asr: float
    """Success rate of the evidence trigger on the labelled data."""


@dataclass(frozen=True)
class SweepResult:
    """ACC / ASR over pruning ratios, and the ratio an accuracy budget allows."""

    rows: tuple[SweepRow, ...]
    """One row per ratio, ascending."""
    base_accuracy: float
    """Accuracy of the unpruned model."""
    base_asr: float
    """Trigger success rate on the unpruned model."""
    target: int
    """Attack target class the ASR counts."""
    score: str
    """What channels were ranked by."""
    max_acc_drop: float | None = None
    """Accuracy budget, when a ratio was chosen."""
    chosen: SweepRow | None = None
    """Lowest-ASR ratio within the budget (smallest ratio on ties), if any fits."""

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def infer_target(model: Model, labelled: DataSource, preprocess: Preprocess, trigger: Trigger,
                 provider: str = "auto", batch_size: int = 64) -> int:
    """The class a trigger sends images to: the most frequent prediction on stamped images."""
    from .evaluate import predictions

    preds = predictions(model, labelled, preprocess, trigger=trigger, provider=provider, batch_size=batch_size)
    return int(np.bincount(preds).argmax())


def choose_ratio(rows: Sequence[SweepRow], base_accuracy: float, max_acc_drop: float) -> SweepRow | None:
    """Lowest ASR among ratios whose accuracy stays within `max_acc_drop` of the original."""
    if not 0.0 <= max_acc_drop <= 1.0:
        raise UsageError(f"--max-acc-drop is a fraction of accuracy in [0, 1], got {max_acc_drop}")
    fitting = [r for r in rows if r.accuracy >= base_accuracy - max_acc_drop - 1e-12]
    if not fitting:
        return None
    return min(fitting, key=lambda r: (r.asr, r.ratio))


def sweep(model: Model, taps: Sequence[Tap], clean: dict[str, ChannelStats], evidence: dict[str, ChannelStats],
          labelled: DataSource, preprocess: Preprocess, trigger: Trigger, *, target: int | None = None,
          score: str = "linf", ratios: Sequence[float] = RATIO_GRID, max_acc_drop: float | None = None,
          provider: str = "auto", batch_size: int = 64) -> SweepResult:
    """Prune at each ratio (differential ranking) and measure clean ACC and the trigger's ASR.

    Args:
        clean: clean statistics of `taps`.
        evidence: statistics of the same taps on trigger-stamped (or synthesized-trigger) images.
        labelled: labelled data to measure on (calibration data with labels, or a held-out set).
        trigger: the trigger whose success is measured (given or synthesized).
        target: its target class; inferred from the stamped predictions when None.
        max_acc_drop: when given, also choose the best ratio within this accuracy budget.
    """
    from .evaluate import evaluate
    from .rewrite import zero_channels

    if not labelled.has_labels:
        raise CalibrationDataError("the sweep needs labelled data (--labels, or calibration data with labels)")
    editable = _load_with_weights(model)
    if target is None:
        target = infer_target(model, labelled, preprocess, trigger, provider, batch_size)
    base = evaluate(model, labelled, preprocess, trigger=trigger, target=target, provider=provider,
                    batch_size=batch_size)
    scores = differential_scores(clean, evidence, score)
    rows = []
    for ratio in sorted(ratios):
        flagged = by_ratio(scores, ratio, score=f"differential {score}", evidence=True)
        proto, _ = zero_channels(editable, taps, flagged.channels())
        ev = evaluate(model, labelled, preprocess, trigger=trigger, target=target, proto=proto, provider=provider,
                      batch_size=batch_size)
        rows.append(SweepRow(ratio, flagged.total, ev.accuracy, float(ev.asr)))
    chosen = choose_ratio(rows, base.accuracy, max_acc_drop) if max_acc_drop is not None else None
    return SweepResult(tuple(rows), base.accuracy, float(base.asr), target, f"differential {score}",
                       max_acc_drop, chosen)


def sweep_model(model_path: str | os.PathLike | Model, calib: str | os.PathLike | DataSource,
                config: ScanConfig | None = None, *, evidence: Evidence, labels: str | os.PathLike | None = None,
                target: int | None = None, ratios: Sequence[float] = RATIO_GRID,
                max_acc_drop: float | None = None, progress: Progress | None = None) -> SweepResult:
    """Measure clean and evidence statistics, then `sweep` the pruning ratio.

    Args:
        labels: labelled data for ACC/ASR; None uses the calibration data, which then needs labels
            (an ``.npz`` with ``y`` or a folder with one subfolder per class).
        evidence: a trigger (given or synthesized); suspect images carry no trigger to measure.
    """
    config = config or ScanConfig(layers="last")
    config.validate()
    if evidence.trigger is None and evidence.synthesize is None:
        raise UsageError("the sweep measures a trigger's success: give --trigger/--mask or --synthesize")
    model = model_path if isinstance(model_path, Model) else load_model(model_path)
    preprocess = config.preprocess.resolve(model)
    if isinstance(calib, DataSource):
        source = calib
    else:
        source = open_source(calib, preprocess, labelled=labels is None and Path(calib).is_dir(), limit=config.limit,
                             input_name=model.input.name)
    evidence = resolve_evidence(model, evidence, source, preprocess, config.provider, progress)
    if evidence.trigger is None:
        reason = synthesis_verdict(evidence.synthesis)[1]
        raise NoEvidenceError(f"trigger synthesis suspects no target class ({reason})",
                              hint="if you know the trigger, pass --trigger/--mask")
    trigger = evidence.load_trigger(preprocess)
    if evidence.synthesis is not None and target is None:
        target = evidence.synthesis.suspected[0]
    labelled = source if labels is None else open_source(labels, preprocess, labelled=True, limit=config.limit)
    if not labelled.has_labels:
        raise CalibrationDataError("the sweep needs labelled data: pass --labels (an .npz with x and y, or a "
                                   "folder with one subfolder per class)")
    taps = find_taps(model, config.layers if isinstance(config.layers, str) else list(config.layers))
    probe = Probe(model, taps, (config.score,), config.provider)
    clean = probe.measure(source, preprocess, config.batch_size, progress=progress)
    stamped = probe.measure(source, preprocess, config.batch_size, trigger, progress)
    return sweep(model, taps, clean, stamped, labelled, preprocess, trigger, target=target, score=config.score,
                 ratios=ratios, max_acc_drop=max_acc_drop, provider=config.provider, batch_size=config.batch_size)
