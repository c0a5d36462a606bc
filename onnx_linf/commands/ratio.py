"""The pruning-ratio sweep (ACC / ASR per ratio) and the ratio an accuracy budget allows."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..decide.flag import by_ratio, differential_scores
from ..errors import CalibrationDataError, UsageError
from ..measure.accuracy import evaluate, predictions
from ..measure.preprocess import Preprocess, Trigger
from ..measure.sources import DataSource
from ..measure.stats import ChannelStats
from ..model.load import Model
from ..model.taps import Tap
from ..rewrite.zero import zero_channels
from .common import load_with_weights

#: Trigger success rate above which a pruning ratio chosen by the accuracy budget is reported as
#: not removing the backdoor (the issue's "removed" is ASR <= 10%).
RESIDUAL_ASR = 0.10

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

    if not labelled.has_labels:
        raise CalibrationDataError("the sweep needs labelled data (--labels, or calibration data with labels)")
    editable = load_with_weights(model)
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
