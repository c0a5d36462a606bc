"""Loading: one broken model per error class, each with its message (fixtures/broken/make_broken.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_linf.errors import ModelLoadError, NoTapsError, UnsupportedModelError
from onnx_linf.measure.session import create_session
from onnx_linf.model.load import load_model, real_inputs
from onnx_linf.model.taps import find_taps

import models

BROKEN = [
    ("not_onnx.onnx", ModelLoadError, "not a valid ONNX model"),
    ("truncated.onnx", ModelLoadError, "not a valid ONNX model"),
    ("missing_external.onnx", ModelLoadError, "external data file 'missing_weights.bin'"),
    ("custom_op.onnx", UnsupportedModelError, "com.example::FancyAct"),
    ("two_inputs.onnx", UnsupportedModelError, "exactly one image input"),
    ("no_conv.onnx", NoTapsError, "no convolutional activation map"),
]


@pytest.mark.parametrize(("name", "error", "message"), BROKEN)
def test_broken_model_raises_its_error(name, error, message, fixtures_dir):
    with pytest.raises(error, match=message):
        find_taps(load_model(fixtures_dir / "broken" / name))


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="model file not found"):
        load_model(tmp_path / "nope.onnx")


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not a file"):
        load_model(tmp_path)


def test_empty_file_is_not_a_model(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        load_model(tmp_path / "empty.onnx")


def test_loaded_model_facts(fixtures_dir):
    model = load_model(fixtures_dir / "digits_badnets.onnx")
    assert model.input.name == "input"
    assert model.input.shape == ("N", 1, 16, 16)
    assert model.opset == 17
    assert len(model.sha256) == 64
    assert not model.has_external_data


def test_old_ir_lists_initializers_as_inputs(model_file):
    """IR < 4 models list every weight among the graph inputs: the real input is the other one."""
    proto = models.plain_cnn()
    for init in proto.graph.initializer:
        proto.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    assert [vi.name for vi in real_inputs(proto.graph)] == ["input"]
    assert load_model(model_file(proto)).input.name == "input"


def test_external_data_model_loads_and_runs(tmp_path):
    """Weights in an external file: not loaded by us, run by ORT from the model's folder."""
    proto = models.plain_cnn()
    path = tmp_path / "ext.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    model = load_model(path)
    assert model.has_external_data
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    ref = create_session(load_model(models.save(proto, tmp_path / "inline.onnx")), None, "cpu").run(None, x)[0]
    got = create_session(model, None, "cpu").run(None, x)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6)
