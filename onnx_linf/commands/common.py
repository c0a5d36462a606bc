"""Pieces the commands share: calibration sources, model copies with weights loaded (lifted to a
newer opset where a rewrite needs it), verification inputs, the prediction-agreement gate and the
report's calibration and policy sections.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np
import onnx
import onnx.version_converter

from ..decide.flag import Flagged
from ..errors import RewriteError, VerificationError
from ..measure.budget import check_batch_memory
from ..measure.calibrate import model_tensor
from ..measure.engine import Engine, EngineOptions, LocalEngine
from ..measure.preprocess import Preprocess
from ..measure.ray_engine import RayEngine
from ..measure.session import create_session
from ..measure.sources import DataSource, open_source
from ..model.load import Model
from ..model.taps import Tap
from .options import ScanConfig

log = logging.getLogger(__name__)

#: Smallest share of the verification images whose top-1 class a rewrite may change and still be
#: written (`--min-agreement`). A q = 100 clamp keeps 100% by construction, and on the benchmark
#: models the prunes and clamps worth keeping changed a few percent; a rewrite that changes most
#: predictions has destroyed the classifier (zeroing a pooled feature vector made one model's
#: output constant while verification against the equally masked reference passed).
MIN_AGREEMENT = 0.5


def open_calibration(model: Model, calib: str | os.PathLike | DataSource, preprocess: Preprocess,
                     limit: int | None, *, taps: Sequence[Tap] = (), batch_size: int = 1) -> DataSource:
    """A calibration source from a path (image folder, arrays, data-loader script) or as given.

    First, before any data is read, one batch of `batch_size` images (input, pixels and `taps`) must
    fit `measure.budget.max_batch_bytes`.

    Raises:
        CalibrationDataError: the batch would not fit, or the data cannot be opened.
    """
    check_batch_memory(model, preprocess, batch_size, taps)
    if isinstance(calib, DataSource):
        return calib
    return open_source(calib, preprocess, limit=limit, input_name=model.input.name)


def make_engine(options: EngineOptions | str | None) -> Engine:
    """The engine calibration runs on (``local``: this process; ``ray``: Ray actors, see `ray_engine`).

    Raises:
        UsageError: inconsistent engine options.
    """
    options = EngineOptions.of(options)
    options.validate()
    if options.name == "ray":
        return RayEngine(options)
    return LocalEngine(options.threads)


def calibration_section(source: DataSource, batch_size: int, batch_note: str | None = None,
                        engine: Engine | None = None) -> dict:
    """The report's record of the calibration data (and of the engine, when it is not this process)."""
    out = {"source": source.description, "images": len(source), "batch_size": batch_size}
    if batch_note:
        out["batch_size_reason"] = batch_note
    described = None if engine is None else engine.describe()
    if described is not None:
        out["engine"] = described
    return out


def policy_section(config: ScanConfig, flagged: Flagged, layers: str | list[str]) -> dict:
    """The report's record of how channels were ranked and flagged."""
    return {"name": flagged.policy, "score": flagged.score, "evidence": flagged.evidence,
            "ratio": config.ratio if flagged.policy == "ratio" else None,
            "threshold": config.threshold if flagged.policy == "outliers" else None,
            "layers": layers}


def load_with_weights(model: Model) -> Model:
    """A copy of the model with external weights loaded, so surgery can read and change them."""
    if not model.has_external_data:
        return model
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    onnx.external_data_helper.load_external_data_for_model(proto, str(model.base_dir))
    return dataclasses.replace(model, proto=proto, has_external_data=False)


def verify_inputs(source: DataSource, preprocess: Preprocess, batch_size: int, limit: int) -> list[np.ndarray]:
    out, seen = [], 0
    for batch in source.batches(batch_size):
        out.append(model_tensor(batch, preprocess))
        seen += len(batch)
        if seen >= limit:
            break
    return out


def top1_agreement(model: Model, proto: onnx.ModelProto, inputs: list[np.ndarray], provider: str) -> float:
    """Fraction of inputs whose top-1 class is the same for the original and the rewritten model."""
    a, b = create_session(model, None, provider), create_session(model, proto, provider)
    same = total = 0
    for x in inputs:
        pa, pb = a.run(None, x)[0], b.run(None, x)[0]
        same += int((pa.argmax(-1) == pb.argmax(-1)).sum())
        total += len(x)
    return same / total if total else float("nan")


def require_agreement(model: Model, proto: onnx.ModelProto, inputs: list[np.ndarray], provider: str,
                      minimum: float, command: str) -> float:
    """Top-1 agreement of the rewritten model with the original on `inputs`; refuse below `minimum`.

    Returns:
        The agreement (NaN without inputs: nothing to gate on).

    Raises:
        VerificationError: the agreement is below `minimum` (the command writes nothing).
    """
    agreement = top1_agreement(model, proto, inputs, provider)
    if agreement < minimum:  # NaN compares False: no inputs, no gate
        raise VerificationError(
            f"{command} changed the top-1 class of {100 * (1 - agreement):.0f}% of the verification images "
            f"(agreement {100 * agreement:.1f}% < --min-agreement {100 * minimum:g}%): the rewritten model no "
            "longer classifies like the original",
            hint="nothing was written; check the maps with onnx-linf inspect, or lower --min-agreement")
    if agreement < 0.9:
        log.warning("%s changed the top-1 class of %.0f%% of the verification images", command,
                    100 * (1 - agreement))
    return agreement


#: Oldest default-domain opset the clamp's Min/Max work on: they broadcast from opset 8.
CLAMP_MIN_OPSET = 8


def lift_for_clamp(model: Model, notes: list[str]) -> Model:
    """The model itself at opset >= 8; an older one as a copy lifted to 8 by onnx.version_converter.

    Min and Max broadcast only from opset 8. The converter's 7 -> 8 adapters change Max, Min, Sum,
    Mean (broadcasting), MaxPool (an optional Indices output), Expand and Scan, none in a way that
    changes what a classifier computes, so the lifted copy computes the same function (and the q =
    100 verification checks it on the calibration images). The written model then imports opset 8:
    a note says so, and the verification's opset check compares against the lifted copy.

    Raises:
        RewriteError: the converter cannot lift the model.
    """
    if not model.opset or model.opset >= CLAMP_MIN_OPSET:
        return model
    try:
        lifted = onnx.version_converter.convert_version(model.proto, CLAMP_MIN_OPSET)
        lifted.ir_version = model.proto.ir_version
        onnx.checker.check_model(lifted)
    except Exception as exc:  # the converter raises bare RuntimeErrors as well as ValidationErrors
        text = str(exc).strip()
        raise RewriteError(f"clamping needs opset >= {CLAMP_MIN_OPSET} (broadcasting Min/Max); the model has "
                           f"opset {model.opset} and onnx.version_converter could not lift it: "
                           f"{text.splitlines()[0] if text else type(exc).__name__}") from None
    notes.append(f"opset {model.opset} lifted to {CLAMP_MIN_OPSET} by onnx.version_converter (Min/Max broadcast "
                 f"from opset 8): the written model imports opset {CLAMP_MIN_OPSET}")
    log.info("lifted opset %d to %d for the clamp", model.opset, CLAMP_MIN_OPSET)
    return dataclasses.replace(model, proto=lifted, opset=CLAMP_MIN_OPSET, lifted_from=model.opset)
