"""``sweep``: measure clean and trigger statistics, then prune at every ratio of a grid."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import CalibrationDataError, NoEvidenceError, UsageError
from ..measure.calibrate import Progress
from ..measure.probe import Probe
from ..measure.sources import DataSource, open_source
from ..model.load import Model, load_model
from ..model.taps import find_taps
from .common import make_engine
from .evidence import Evidence, evidence_verdict, resolve_evidence
from .options import ScanConfig
from .ratio import RATIO_GRID, SweepResult, sweep


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
        searched = "the verdict" if evidence.probes is not None else "trigger synthesis"
        raise NoEvidenceError(f"{searched} suspects no target class ({evidence_verdict(evidence)[1]})",
                              hint="if you know the trigger, pass --trigger/--mask")
    trigger = evidence.load_trigger(preprocess)
    if evidence.synthesis is not None and target is None:
        target = evidence.suspected_classes()[0]
    labelled = source if labels is None else open_source(labels, preprocess, labelled=True, limit=config.limit)
    if not labelled.has_labels:
        raise CalibrationDataError("the sweep needs labelled data: pass --labels (an .npz with x and y, or a "
                                   "folder with one subfolder per class)")
    taps = find_taps(model, config.layers if isinstance(config.layers, str) else list(config.layers))
    probe = Probe(model, taps, (config.score,), config.provider, engine=make_engine(config.engine))
    clean = probe.measure(source, preprocess, config.batch_size, progress=progress)
    stamped = probe.measure(source, preprocess, config.batch_size, trigger, progress)
    return sweep(model, taps, clean, stamped, labelled, preprocess, trigger, target=target, score=config.score,
                 ratios=ratios, max_acc_drop=max_acc_drop, provider=config.provider, batch_size=config.batch_size)
