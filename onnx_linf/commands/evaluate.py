"""``evaluate``: clean accuracy and, with a trigger, attack success rate of a model on labelled data."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UsageError
from ..measure.accuracy import Evaluation, evaluate, open_labelled
from ..measure.calibrate import Progress
from ..measure.engine import EngineOptions
from ..measure.preprocess import Trigger
from ..model.load import Model, load_model
from ..report.types import EvaluationReport
from ..rewrite.clamp import GATED_OUTPUT
from .common import make_engine
from .options import PreprocessOptions


@dataclass(frozen=True)
class EvaluateResult:
    """What `evaluate_model` measured."""

    evaluation: Evaluation
    """Accuracy and attack success rate."""
    report: EvaluationReport
    """The report (`EvaluationReport.to_dict` for its JSON form)."""


def evaluate_model(model_path: str | os.PathLike | Model, data: str | os.PathLike, *,
                   trigger: str | os.PathLike | None = None, mask: str | os.PathLike | None = None,
                   target: int | None = None, batch_size: int = 64, provider: str = "auto",
                   limit: int | None = None, preprocess: PreprocessOptions | None = None,
                   progress: Progress | None = None, engine: EngineOptions | str | None = None) -> EvaluateResult:
    """Measure clean accuracy and, with `trigger` (and `mask`) and `target`, the attack success rate.

    ASR = fraction of images whose true label is not the target that are classified as the target
    after the trigger is stamped. A model with the clamp's gate output (``onnx_linf_gated``) is also
    measured as a deployment that refuses the inputs it names (`Evaluation.refused` and after).

    Raises:
        UsageError: `mask` without `trigger`, or `trigger` without `target` (or the reverse).
        CalibrationDataError: the data has no labels.
    """
    if trigger is None and mask is not None:
        raise UsageError("--mask needs --trigger")
    if (trigger is None) != (target is None):
        raise UsageError("--trigger and --target go together")
    model = model_path if isinstance(model_path, Model) else load_model(model_path)
    pre = (preprocess or PreprocessOptions()).resolve(model)
    trig = Trigger.from_files(trigger, mask, pre) if trigger is not None else None
    source = open_labelled(data, pre, limit)
    refusal = GATED_OUTPUT if GATED_OUTPUT in [o.name for o in model.proto.graph.output] else None
    result = evaluate(model, source, pre, trigger=trig, target=target, batch_size=batch_size, provider=provider,
                      progress=progress, engine=make_engine(engine), refusal=refusal)
    report = EvaluationReport(model=str(model_path if not isinstance(model_path, Model) else model.path),
                              sha256=model.sha256, data=str(data), preprocess=pre.to_dict(),
                              evaluation=result.to_dict())
    return EvaluateResult(result, report)
