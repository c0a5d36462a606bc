"""Shared fixtures: paths of the committed digits fixtures and small models saved to tmp dirs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnx_linf.measure.session import Session

import models

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def model_file(tmp_path):
    """Save a builder's model into tmp_path and return its path: model_file(models.plain_cnn())."""
    def save(proto, name: str = "model.onnx") -> Path:
        return Path(models.save(proto, tmp_path / name))
    return save


@pytest.fixture
def pixels_file(tmp_path):
    """Write seeded uint8 NHWC pixels to an .npy file: pixels_file(n, h, w, c)."""
    def make(n: int, h: int, w: int, c: int = 3, seed: int = 0, name: str = "pixels.npy") -> Path:
        x = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
        path = tmp_path / name
        np.save(path, x)
        return path
    return make


@pytest.fixture
def session_images(monkeypatch):
    """Count every image that reaches ONNX Runtime through any `Session` (a list of batch sizes)."""
    seen: list[int] = []
    run = Session.run

    def counting(self, outputs, tensor, batch_level=()):
        seen.append(int(tensor.shape[0]))
        return run(self, outputs, tensor, batch_level)

    monkeypatch.setattr(Session, "run", counting)
    return seen
