"""``prune``: zero the channels trigger evidence drives, verify against an independent reference, write."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import onnx

from ..decide.finite import require_finite
from ..decide.flag import from_channels
from ..decide.synthesis.results import SynthConfig
from ..errors import CalibrationDataError, NoEvidenceError, UsageError
from ..measure.calibrate import Progress
from ..measure.probe import Probe
from ..measure.probes import ProbeConfig
from ..measure.sources import DataSource, open_source
from ..model.files import check_output_path, save_model
from ..model.load import Model, load_model
from ..model.taps import find_taps
from ..report.reader import load_report
from ..report.types import ModelInfo, ScanReport, tap_reports
from ..rewrite.graph import check_rewritable
from ..rewrite.reference import mask_reference
from ..rewrite.verify import require_ok, verify_model
from ..rewrite.zero import zero_channels
from .common import (
    MIN_AGREEMENT,
    calibration_section,
    load_with_weights,
    make_engine,
    open_calibration,
    policy_section,
    require_agreement,
    verify_inputs,
)
from .evidence import Evidence, evidence_verdict, measure_evidence, resolve_evidence, score_and_flag
from .options import ScanConfig
from .ratio import RESIDUAL_ASR, SweepResult, sweep

log = logging.getLogger(__name__)


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
    probes: ProbeConfig | None = field(default_factory=ProbeConfig)
    """With no evidence given, also run the verdict's probe families (`measure.probes`) with the patch
    search: a class only they suspect is pruned by its best probe (a grating, a noise blend). None:
    the patch search alone."""
    max_acc_drop: float | None = None
    """Pick the ratio automatically: lowest trigger ASR with accuracy within this drop (needs labels)."""
    labels: str | os.PathLike | None = None
    """Labelled data for the automatic ratio (default: the calibration data, if labelled)."""
    target: int | None = None
    """Attack target for the automatic ratio's ASR (default: inferred from stamped predictions)."""
    min_agreement: float = MIN_AGREEMENT
    """Refuse to write when fewer verification images keep their top-1 class (`common.MIN_AGREEMENT`)."""


@dataclass(frozen=True)
class PruneResult:
    """What `prune` did."""

    report: ScanReport
    """Scan-style report; `extra` holds ``surgery``, ``verification``, ``output`` and ``evaluation``."""
    proto: onnx.ModelProto = field(repr=False)
    """The pruned model (already written when an output path was given)."""


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
        VerificationError: the pruned model differs from the masked reference, or changes the top-1
            class of more verification images than `PruneConfig.min_agreement` allows; nothing is written.
    """

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

        evidence = Evidence(synthesize=config.synthesize or SynthConfig(), probes=config.probes)
    model = model_path if isinstance(model_path, Model) else load_model(model_path)
    check_rewritable(model)  # before any calibration pass
    if output is not None:
        check_output_path(output, [model.path], force)
    preprocess = scan_cfg.preprocess.resolve(model)
    source = open_calibration(model, calib, preprocess, scan_cfg.limit)
    engine = make_engine(scan_cfg.engine)

    if from_report is not None:
        report_in = load_report(from_report)
        if report_in.model.sha256 != model.sha256:
            raise UsageError(f"{from_report} was made for another model (sha256 {report_in.model.sha256[:12]}, "
                             f"this one {model.sha256[:12]})")
        wanted = report_in.flagged_channels()
        if not wanted:
            raise UsageError(f"{from_report} flags no channels: nothing to prune")
        taps = find_taps(model, list(wanted))
        probe = Probe(model, taps, scan_cfg.measured_stats, scan_cfg.provider, engine=engine)
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
                searched = "the verdict" if evidence.probes is not None else "trigger synthesis"
                raise NoEvidenceError(
                    f"{searched} suspects no target class: there is no evidence to prune by "
                    f"({evidence_verdict(evidence)[1]})",
                    hint="if you know the trigger, pass --trigger/--mask; the clamp needs no trigger")
        probe = Probe(model, taps, scan_cfg.measured_stats, scan_cfg.provider, engine=engine)
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

    require_finite(clean, "prune")  # a NaN model verifies against a NaN reference: refuse instead
    editable = load_with_weights(model)
    channels = flagged.channels()
    pruned, records = zero_channels(editable, taps, channels, fold=config.fold)
    reference = mask_reference(editable, channels)
    inputs = verify_inputs(source, preprocess, scan_cfg.batch_size, config.verify_images)
    result = verify_model(editable, pruned, reference, inputs, atol=config.atol, rtol=config.rtol,
                          provider=scan_cfg.provider)
    require_ok(result)
    # The verification compares against the equally masked reference, so it cannot see a prune that
    # destroys the classifier (a pooled vector taken for a map): the agreement gate can.
    agreement = require_agreement(editable, pruned, inputs, scan_cfg.provider, config.min_agreement, "prune")
    if output is not None:
        save_model(pruned, output, external_data=model.has_external_data)
        log.info("wrote %s", output)

    report = ScanReport(
        model=ModelInfo.of(model),
        provider=probe.provider,
        preprocess=preprocess.to_dict(),
        calibration=calibration_section(source, scan_cfg.batch_size, engine=engine),
        policy=dict(policy_section(scan_cfg, flagged, [t.name for t in taps]),
                    ratio_chosen_by=None if swept is None else f"sweep, max accuracy drop {config.max_acc_drop:g}"),
        taps=tap_reports(taps, clean, flagged, ev_stats),
        verdict="not-assessed",
        verdict_reason=f"pruned {flagged.total} channels ranked by {flagged.score}",
        evidence=(evidence.describe() if evidence is not None
                  else {"kind": "report", "path": str(from_report)} if from_report is not None else None),
        extra={
            "surgery": [dataclasses.asdict(r) for r in records],
            "verification": dataclasses.asdict(result),
            "calibration_agreement": agreement,
            "output": None if output is None else str(output),
            "sweep": None if swept is None else swept.to_dict(),
            "synthesis": None if evidence is None or evidence.synthesis is None else evidence.synthesis.to_dict(),
            "notes": notes,
        },
    )
    return PruneResult(report=report, proto=pruned)
