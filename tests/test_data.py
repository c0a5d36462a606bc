"""Calibration data: sources, preprocessing and pixel-space triggers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from onnx_linf.errors import CalibrationDataError, UsageError
from onnx_linf.measure.preprocess import Preprocess, Trigger
from onnx_linf.measure.sources import ArraySource, ImageFolder, open_source
from onnx_linf.model.load import load_model

import models


def test_preprocess_from_fixture_metadata(fixtures_dir):
    pp = Preprocess.from_model(load_model(fixtures_dir / "digits_badnets.onnx"))
    assert pp.size == (16, 16) and pp.channels == "L" and pp.layout == "NCHW"
    assert pp.source == "model metadata"


def test_preprocess_apply_mean_std_bgr_layout(model_file):
    model = load_model(model_file(models.nhwc_input()))
    pp = Preprocess.from_model(model, channels="BGR", mean=(0.5,), std=(0.25,))
    assert pp.layout == "NHWC" and pp.size == (8, 8)
    px = np.zeros((1, 8, 8, 3), np.uint8)
    px[..., 0] = 255  # red
    x = pp.apply(px)
    assert x.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(x[0, 0, 0], [-2.0, -2.0, 2.0])  # BGR: red lands last


def test_dynamic_spatial_needs_size(model_file):
    model = load_model(model_file(models.dynamic_spatial()))
    with pytest.raises(UsageError, match="pass --size HxW"):
        Preprocess.from_model(model)
    assert Preprocess.from_model(model, size=(12, 10)).size == (12, 10)


def test_channel_mismatch_is_an_error(model_file):
    with pytest.raises(UsageError, match="takes 3 channels"):
        Preprocess.from_model(load_model(model_file(models.plain_cnn())), channels="L")


def test_image_folder_recursive_resizes_and_keeps_order(tmp_path):
    (tmp_path / "sub").mkdir()
    for i, folder in enumerate([tmp_path, tmp_path / "sub", tmp_path]):
        Image.fromarray(np.full((20, 30, 3), i * 50, np.uint8)).save(folder / f"img{i}.png")
    src = ImageFolder(tmp_path, (8, 8), "RGB", workers=2)
    batches = list(src.batches(2))
    assert len(src) == 3 and [len(b) for b in batches] == [2, 1]
    assert batches[0].pixels.shape == (2, 8, 8, 3)


def test_empty_folder_and_unreadable_image(tmp_path):
    with pytest.raises(CalibrationDataError, match="no images found"):
        ImageFolder(tmp_path, (8, 8))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(CalibrationDataError, match="cannot read image"):
        list(ImageFolder(tmp_path, (8, 8)).batches(4))


def test_arrays_uint8_are_pixels_float_are_tensors(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((5, 8, 8, 3), np.uint8), y=np.arange(5))
    src = ArraySource(tmp_path / "a.npz", (8, 8), "RGB")
    assert src.has_pixels and src.has_labels
    np.save(tmp_path / "f.npy", np.zeros((4, 3, 8, 8), np.float32))
    src = ArraySource(tmp_path / "f.npy")
    assert not src.has_pixels and next(src.batches(8)).tensor.shape == (4, 3, 8, 8)
    with pytest.raises(CalibrationDataError, match="images are 8x8 but the model takes 16x16"):
        ArraySource(tmp_path / "a.npz", (16, 16), "RGB")
    with pytest.raises(CalibrationDataError, match="data path not found"):
        open_source(tmp_path / "missing", Preprocess((8, 8)))


def test_trigger_stamp_formula(fixtures_dir):
    pp = Preprocess((16, 16), channels="L")
    trig = Trigger.from_files(fixtures_dir / "digits_badnets_trigger.png", fixtures_dir / "digits_badnets_mask.png", pp)
    px = np.full((2, 16, 16, 1), 100, np.uint8)
    out = trig.stamp(px)
    m = trig.mask
    expected = np.rint((1 - m) * 100 + m * trig.pattern).astype(np.uint8)
    np.testing.assert_array_equal(out[0], expected)
    assert int((m > 0).sum()) == 9  # the 3x3 patch


def test_trigger_size_mismatch(tmp_path):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "t.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "m8.png")
    with pytest.raises(CalibrationDataError, match="trigger t.png is 10x10 but the model input is 16x16"):
        Trigger.from_files(tmp_path / "t.png", tmp_path / "m8.png", Preprocess((16, 16), channels="L"))
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "t16.png")
    with pytest.raises(CalibrationDataError, match="mask m8.png is 8x8 but the trigger is 16x16"):
        Trigger.from_files(tmp_path / "t16.png", tmp_path / "m8.png", Preprocess((16, 16), channels="L"))


def test_data_loader_script(tmp_path, model_file):
    """Polygraphy-style loader: a function yielding feed dicts of preprocessed batches."""
    from typer.testing import CliRunner

    from onnx_linf.cli.app import app

    (tmp_path / "loader.py").write_text(
        "import numpy as np\n"
        "def feeds():\n"
        "    rng = np.random.default_rng(0)\n"
        "    for _ in range(3):\n"
        "        yield {'input': rng.normal(size=(4, 3, 8, 8)).astype(np.float32)}\n")
    model = model_file(models.plain_cnn())
    src = open_source(f"{tmp_path / 'loader.py'}:feeds", Preprocess((8, 8)), input_name="input")
    assert len(src) == 12 and not src.has_pixels
    r = CliRunner().invoke(app, ["scan", str(model), "--calib", f"{tmp_path / 'loader.py'}:feeds", "--json", "-", "-q"])
    assert r.exit_code == 0, r.stderr
    assert '"images": 12' in r.stdout
    r = CliRunner().invoke(app, ["scan", str(model), "--calib", str(tmp_path / "loader.py")])
    assert r.exit_code == 2 and "defines no function load_data()" in r.stderr
