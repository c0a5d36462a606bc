"""Activation heatmaps: the in-graph Gather of chosen channels equals numpy on the raw activation, and which
channels a scan shows."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_linf.commands.heatmaps import MAX_CHANNELS, choose_maps
from onnx_linf.measure.channel_maps import sample_maps
from onnx_linf.measure.instrument import RAW, instrument
from onnx_linf.measure.preprocess import Preprocess, Trigger
from onnx_linf.measure.session import create_session
from onnx_linf.measure.sources import ArraySource, FeedSource
from onnx_linf.model.load import load_model
from onnx_linf.model.taps import find_taps

import models
import reports

CASES = {
    "plain_cnn_opset13": (lambda: models.plain_cnn(opset=13), "NCHW"),
    "plain_cnn_opset18": (lambda: models.plain_cnn(opset=18), "NCHW"),
    "plain_cnn_fixed_batch": (lambda: models.plain_cnn(batch=5), "NCHW"),
    "resnet_block": (models.resnet_block, "NCHW"),
    "nhwc_input": (models.nhwc_input, "NHWC"),
    "float16": (lambda: models.to_float16(models.plain_cnn()), "NCHW"),
}


def raw_maps(model, taps, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every tap's whole activation, from a separately instrumented model (RAW)."""
    raw = instrument(model, taps, stats=(RAW,))
    values = create_session(model, raw.proto, "cpu").run(raw.output_names(), x)
    return {raw.outputs[n].tap: v for n, v in zip(raw.output_names(), values)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gathered_channel_maps_equal_numpy_on_the_raw_activation(case, model_file, tmp_path):
    build, layout = CASES[case]
    model = load_model(model_file(build()))
    taps = find_taps(model, "all")
    rng = np.random.default_rng(3)
    channels = {tap: tuple(int(c) for c in rng.choice(tap.channels, size=min(3, tap.channels), replace=False))
                for tap in taps}
    pixels = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "px.npy", pixels)
    pre = Preprocess(size=(8, 8), layout=layout)
    mask = np.zeros((8, 8, 1), np.float32)
    mask[5:, 5:] = 1.0
    trigger = Trigger(pattern=np.full((8, 8, 3), 255.0, np.float32), mask=mask)
    source = ArraySource(tmp_path / "px.npy")
    clean, stamped = sample_maps(model, channels, [(source, None), (source, trigger)], pre, images=4, provider="cpu")

    np.testing.assert_array_equal(clean.pixels, pixels[:4])
    np.testing.assert_array_equal(stamped.pixels, trigger.stamp(pixels[:4]))
    for run, shown in ((clean, pixels[:4]), (stamped, trigger.stamp(pixels[:4]))):
        # Five images where the model fixes the batch at 5: the reference runs the whole batch.
        x = pre.apply(np.concatenate([shown, pixels[4:5]]) if case.endswith("fixed_batch") else shown)
        full = raw_maps(model, taps, x.astype(np.float16) if case == "float16" else x)
        for tap in taps:
            got = run.maps[tap.name]
            want = full[tap.name][:4][:, list(channels[tap])]
            assert got.dtype == np.float32 and got.shape == (4, len(channels[tap]), *want.shape[2:])
            # float16: the reference casts the whole map, ours only the gathered channels, and ORT's
            # fusions may round the two graphs differently (within float16 precision).
            tol = 2e-3 if case == "float16" else 0.0
            np.testing.assert_allclose(got, want.astype(np.float32), rtol=tol, atol=tol, err_msg=f"{case} {tap.name}")
    assert not np.array_equal(clean.maps[taps[0].name], stamped.maps[taps[0].name])


def test_preprocessed_sources_give_maps_without_pixels(model_file):
    model = load_model(model_file(models.plain_cnn()))
    taps = find_taps(model, "last")
    x = np.random.default_rng(0).normal(size=(6, 3, 8, 8)).astype(np.float32)
    (run,) = sample_maps(model, {taps[0]: (4, 0)}, [(FeedSource([x]), None)], Preprocess(size=(8, 8)), 2, "cpu")
    assert run.pixels is None
    np.testing.assert_array_equal(run.maps[taps[0].name], raw_maps(model, taps, x[:2])[taps[0].name][:, [4, 0]])


def test_scan_shows_the_last_map_and_the_most_flagged_one():
    scanned = reports.plain_scan()
    heat = scanned.visuals.heatmaps
    last = next(t for t in scanned.taps if t.is_last)
    assert [m.tap for m in heat.maps][-1] == last.name
    assert heat.evidence_pixels is None and all(m.evidence is None for m in heat.maps)
    for m in heat.maps:
        tap = next(t for t in scanned.taps if t.name == m.tap)
        assert m.channels == tuple(tap.flagged[:MAX_CHANNELS])
        assert m.clean.shape == (4, len(m.channels), *tap.spatial)
    assert heat.clean_pixels.shape == (4, 16, 16, 1) and heat.clean_pixels.dtype == np.uint8
    # Nothing of it in the JSON form.
    assert "heatmaps" not in str(scanned.to_dict()) and "visuals" not in scanned.to_dict()
    assert choose_maps([], None, {}) == []
