"""Cheap, real reports for the writer tests: scans of the digits fixtures on a few images (cached)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnx_linf import Evidence, ScanConfig, scan

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
#: The official SARIF 2.1.0 JSON schema (OASIS sarif-spec, Schemata/sarif-schema-2.1.0.json: see its $id),
#: vendored byte for byte as SchemaStore distributes it ("sarif-2.1.0"); no maintained Python package ships it.
SARIF_SCHEMA = Path(__file__).resolve().parent / "schemas" / "sarif-schema-2.1.0.json"
CALIB = FIXTURES / "digits_calib"


@functools.cache
def plain_scan(name: str = "digits_badnets"):
    """Scan without evidence (verdict not-assessed), 32 images."""
    return scan(FIXTURES / f"{name}.onnx", CALIB, ScanConfig(limit=32, provider="cpu", heatmap_images=4))


def stamped_pixels(path: Path, n: int = 32) -> Path:
    """The first n calibration images with the BadNets trigger stamped, as uint8 [n, 16, 16, 1] in an .npy."""
    files = sorted(CALIB.rglob("*.png"))[:n]
    x = np.stack([np.asarray(Image.open(f).convert("L"), dtype=np.float32) for f in files])[..., None]
    t = np.asarray(Image.open(FIXTURES / "digits_badnets_trigger.png").convert("L"), dtype=np.float32)[..., None]
    m = np.asarray(Image.open(FIXTURES / "digits_badnets_mask.png").convert("L"), dtype=np.float32)[..., None] / 255
    np.save(path, np.clip(np.rint((1 - m) * x + m * t), 0, 255).astype(np.uint8))
    return path


@functools.cache
def suspect_scan(folder: str):
    """Scan of the BadNets model with trigger-stamped suspect images (bounds exceedance measured)."""
    suspects = stamped_pixels(Path(folder) / "suspects.npy")
    return scan(FIXTURES / "digits_badnets.onnx", CALIB, ScanConfig(limit=32, provider="cpu", heatmap_images=4),
                evidence=Evidence(suspect=suspects))


def validate(log: dict) -> None:
    """Validate a SARIF log against the official 2.1.0 schema (jsonschema is a dev dependency)."""
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft7Validator(json.loads(SARIF_SCHEMA.read_text())).validate(json.loads(json.dumps(log)))
