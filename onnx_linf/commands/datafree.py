"""The data-free scan: what ``scan`` can say about a model when no calibration data is given.

Two checks (see `decide.datafree`): the CLP outlier statistic from the convolution weights, and the
query-only margin probe from uniform-noise inputs (`measure.margin`). The report carries both, with
their statistic, threshold and cost, the verdict labelled data-free, and what could not be checked.
"""

from __future__ import annotations

import logging

from ..decide.datafree import (
    CLP_THRESHOLD,
    MARGIN_THRESHOLD,
    DataFreeVerdict,
    MarginCheck,
    clp_check,
    datafree_verdict,
    margin_ratio,
)
from ..decide.flag import clp_scores
from ..measure.margin import MarginConfig, max_margins
from ..measure.preprocess import Preprocess
from ..measure.session import create_session
from ..model.load import Model
from ..model.taps import Tap
from ..report.types import ModelInfo, ScanReport
from .common import load_with_weights

log = logging.getLogger(__name__)


def datafree_checks(model: Model, taps: list[Tap], preprocess: Preprocess, provider: str = "auto",
                    margin: MarginConfig | None = None, *, clp_threshold: float = CLP_THRESHOLD,
                    margin_threshold: float = MARGIN_THRESHOLD) -> tuple[DataFreeVerdict, str]:
    """Run the CLP and margin checks and combine them.

    Args:
        model: the classifier.
        taps: its activation maps (CLP scores the conv ones).
        preprocess: how pixels become the input (the margin probe searches pixel space).
        provider: ONNX Runtime provider.
        margin: margin-probe options (query budget, classes, seed, time limit).
        clp_threshold: CLP robust z-score threshold.
        margin_threshold: margin-ratio threshold.

    Returns:
        The verdict and the provider that ran the probe.

    Raises:
        LinfError: bad options or a model ONNX Runtime rejects.
    """
    clp = clp_check(clp_scores(load_with_weights(model), taps), clp_threshold)
    session = create_session(model, None, provider)
    result = max_margins(model, preprocess, margin, provider, session=session)
    ratio, top = margin_ratio(result.margins)
    check = MarginCheck(
        statistic=ratio, threshold=margin_threshold, top_class=result.classes[top],
        margins={k: float(v) for k, v in zip(result.classes, result.margins)},
        noise_margins={k: float(v) for k, v in zip(result.classes, result.noise_margins)},
        not_examined=result.not_examined, queries=result.queries, seconds=result.seconds,
        complete=result.complete, extra={"steps": result.steps, "classes": result.num_classes})
    return datafree_verdict(clp, check), session.provider


def datafree_report(model: Model, taps: list[Tap], preprocess: Preprocess, provider: str = "auto",
                    margin: MarginConfig | None = None, layers: str | list[str] = "all") -> ScanReport:
    """The scan report of a data-free scan (no per-channel statistics: there are no images to measure).

    Args:
        model: the classifier.
        taps: its activation maps.
        preprocess: preprocessing (from the model's metadata or options: nothing checks it without data).
        provider: ONNX Runtime provider.
        margin: margin-probe options.
        layers: the ``--layers`` selection, for the policy section.

    Returns:
        A report with ``verdict`` ``clean`` or ``suspected``, ``evidence.kind`` ``data-free`` and the
        checks in ``extra["datafree"]``.
    """
    verdict, ran_on = datafree_checks(model, taps, preprocess, provider, margin)
    log.info("data-free verdict %s: %s", verdict.verdict, verdict.reason)
    return ScanReport(
        model=ModelInfo.of(model),
        provider=ran_on,
        preprocess=preprocess.to_dict(),
        calibration={"source": None, "images": 0, "batch_size": None, "data_free": True},
        policy={"name": "data-free", "score": "clp", "evidence": False, "ratio": None,
                "threshold": None, "layers": layers},
        taps=[],
        verdict=verdict.verdict,
        verdict_reason=verdict.reason,
        evidence={"kind": "data-free", "target": verdict.target},
        extra={"datafree": verdict.to_dict(), "notes": [
            "data-free scan: no calibration data, so no activation statistics, no trigger synthesis and an "
            "unchecked preprocessing; a scan with --calib (and --synthesize) is stronger"]},
    )
