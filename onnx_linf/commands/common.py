"""Pieces the commands share: calibration sources, model copies with weights loaded, verification
inputs, prediction agreement and the report's calibration and policy sections.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx

from ..decide.flag import Flagged
from ..measure.calibrate import model_tensor
from ..measure.preprocess import Preprocess
from ..measure.session import create_session
from ..measure.sources import DataSource, open_source
from ..model.load import Model
from .options import ScanConfig


def open_calibration(model: Model, calib: str | os.PathLike | DataSource, preprocess: Preprocess,
                     limit: int | None) -> DataSource:
    """A calibration source from a path (image folder, arrays, data-loader script) or as given."""
    if isinstance(calib, DataSource):
        return calib
    return open_source(calib, preprocess, limit=limit, input_name=model.input.name)


def calibration_section(source: DataSource, batch_size: int, batch_note: str | None = None) -> dict:
    """The report's record of the calibration data."""
    out = {"source": source.description, "images": len(source), "batch_size": batch_size}
    if batch_note:
        out["batch_size_reason"] = batch_note
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
