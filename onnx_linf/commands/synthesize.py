"""``synthesize``: search the smallest trigger per class with forward passes only, and write them."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..decide.synthesis.results import SynthConfig, SynthResult
from ..decide.synthesis.synthesize import synthesize
from ..decide.synthesis.triggers import write_triggers
from ..measure.calibrate import Progress
from ..measure.sources import open_source
from ..model.load import Model, load_model
from ..report.types import ModelInfo, SynthesisReport
from ..report.visuals import Visuals
from .options import PreprocessOptions


@dataclass(frozen=True)
class SynthesizeResult:
    """What `synthesize_model` found."""

    synthesis: SynthResult
    """Per-class triggers, anomaly indices and suspected classes."""
    report: SynthesisReport
    """The report (`SynthesisReport.to_dict` for its JSON form)."""


def synthesize_model(model_path: str | os.PathLike | Model, calib: str | os.PathLike,
                     config: SynthConfig | None = None, *, out_dir: str | os.PathLike | None = None,
                     provider: str = "auto", preprocess: PreprocessOptions | None = None,
                     progress: Progress | None = None) -> SynthesizeResult:
    """Search a trigger per class (see `decide.synthesis`), optionally write them as PNGs to `out_dir`.

    Raises:
        UsageError: bad options.
        CalibrationDataError: unreadable calibration data.
    """
    config = config or SynthConfig()
    config.validate()
    model = model_path if isinstance(model_path, Model) else load_model(model_path)
    pre = (preprocess or PreprocessOptions()).resolve(model)
    # No limit here: the search spreads its `images` evenly over the source.
    source = open_source(calib, pre)
    result = synthesize(model, source, pre, config, provider=provider, progress=progress)
    if out_dir is not None:
        write_triggers(result, out_dir)
    report = SynthesisReport(synthesis=result.to_dict(), model=ModelInfo.of(model), preprocess=pre.to_dict(),
                             calibration={"source": source.description},
                             visuals=Visuals.of_triggers(result.triggers))
    return SynthesizeResult(result, report)
