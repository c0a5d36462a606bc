"""Read a scan report back from JSON (``prune --from-report``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CalibrationDataError
from .types import SCHEMA_VERSION, ScanReport


def load_report(path: str | os.PathLike) -> ScanReport:
    """Read a report written by ``--json``.

    Raises:
        CalibrationDataError: unreadable file, not JSON, or not an onnx-linf report.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalibrationDataError(f"report not found: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CalibrationDataError(f"cannot read report {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("tool") != "onnx-linf" or "taps" not in data:
        raise CalibrationDataError(f"{path} is not an onnx-linf report")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise CalibrationDataError(
            f"{path} has report schema {data.get('schema_version')}, this onnx-linf reads {SCHEMA_VERSION}")
    try:
        return ScanReport.from_dict(data)
    except (KeyError, TypeError) as exc:
        raise CalibrationDataError(f"{path} is not a valid onnx-linf report ({exc})") from None
