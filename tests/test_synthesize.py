"""Query-only trigger synthesis: anomaly index, a planted trigger, determinism, budgets, files, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from onnx_linf.cli.synthesize import synthesize_command
from onnx_linf.decide.synthesis.results import SynthConfig
from onnx_linf.decide.synthesis.synthesize import synthesize
from onnx_linf.decide.synthesis.triggers import write_triggers
from onnx_linf.decide.synthesis.verdict import MAD_FLOOR_LINEAR, MAD_FLOOR_LOG, anomaly_index
from onnx_linf.errors import CalibrationDataError, UsageError
from onnx_linf.measure.preprocess import Preprocess, Trigger
from onnx_linf.measure.session import create_session
from onnx_linf.measure.sources import ArraySource, FeedSource
from onnx_linf.model.load import load_model

import models

# The planted trigger: a bright 2x2 patch at rows 5-6, cols 5-6 of an 8x8 grayscale image.
PATCH = (slice(5, 7), slice(5, 7))
TARGET = 2
# Small budgets: the planted model is linear after one conv, so a few dozen steps find it.
FAST = dict(steps=30, pairs=10, batch=8, eval_images=32, patch_steps=6, patch_windows=2, patch_samples=8,
            evidence=False)


def planted_model():
    """input[N,1,8,8] -> Conv(2x2, 2 channels) -> Relu -> Flatten -> Gemm -> logits[N,3]

    Channel 0 is the 2x2 mean filter, channel 1 copies the top-left pixel of each window. Logit 2 is
    ``20 * mean(patch) - 15``: positive only when the 2x2 patch at (5, 5) is nearly white. Logits 0 and
    1 are the mean of the left and right halves of the image, so clean images (pixels below 0.5) go
    to class 0 or 1 and never to class 2.
    """
    fc = np.zeros((3, 2, 7, 7))
    fc[0, 1, :, :4] = 1.0 / 28
    fc[1, 1, :, 4:] = 1.0 / 21
    fc[2, 0, 5, 5] = 20.0
    return models.patch_classifier(fc, np.array([0.0, 0.0, -15.0]))


@pytest.fixture
def planted(model_file, tmp_path):
    return models.grey_calibration(model_file(planted_model(), "planted.onnx"), tmp_path)


def test_anomaly_index_on_hand_made_norms():
    norms = np.array([40.0, 42.0, 38.0, 41.0, 39.0, 5.0, 60.0])
    for scale, values in (("linear", norms), ("log", np.log(norms))):
        index = anomaly_index(norms, scale)
        med = np.median(values)
        mad = np.median(np.abs(values - med))
        floor = MAD_FLOOR_LOG if scale == "log" else MAD_FLOOR_LINEAR * med
        np.testing.assert_allclose(index, (med - values) / (1.4826 * max(mad, floor)))
        assert index[5] > 3.5 > index[6]  # small norm: positive (suspicious); large norm: negative
        assert np.argmax(index) == 5
    assert np.array_equal(anomaly_index(norms), anomaly_index(norms, "log"))


def test_classes_not_found_do_not_set_the_baseline():
    """Not-found classes carry the image area (a bound, not a measurement); with most of them at
    the same value the MAD would be 0 and every found class an outlier."""
    area = 1024.0
    norms = np.array([108.4, 378.7, area, area, 533.0, area, area, 486.0, area, area])
    found = norms < area
    everyone = anomaly_index(norms)
    # The degenerate baseline (MAD 0, floored): three "targets", all found classes below half the area.
    assert (everyone > 3.5).sum() == 3
    index = anomaly_index(norms, found=found)
    assert np.flatnonzero(index > 3.5).tolist() == [0]
    assert np.all(index[~found] < 0)
    # Fewer than three found: no baseline among them; the one found class stands out from the rest.
    few = np.array([20.0, area, area, area, area])
    assert np.flatnonzero(anomaly_index(few, found=few < area) > 3.5).tolist() == [0]
    with pytest.raises(ValueError, match="found must have the shape of norms"):
        anomaly_index(few, found=np.array([True, False]))


def test_log_index_sees_a_small_trigger_that_a_heavy_upper_tail_hides():
    """Hard-to-reach classes (large norms) inflate the linear MAD; ratios are what matter."""
    norms = np.array([10.0, 350.0, 1024.0, 1024.0, 340.0, 1024.0, 270.0, 360.0, 385.0, 223.0])
    linear, log = anomaly_index(norms, "linear"), anomaly_index(norms, "log")
    assert linear[0] < 2.5 and log[0] > 5  # 35x smaller than the median, yet barely an outlier linearly
    assert np.sort(log)[-2] < 1.5
    with pytest.raises(ValueError):
        anomaly_index(norms, "sqrt")
    # Every norm equal but one: MAD is 0, floored, so the odd one (10x smaller) gets a finite index
    # of ln(10) / (1.4826 * MAD_FLOOR_LOG) and one at 0.6x the others stays below 3.5.
    flat = anomaly_index(np.array([10.0, 10.0, 10.0, 10.0, 1.0]))
    assert flat[:4].tolist() == [0.0] * 4
    np.testing.assert_allclose(flat[4], np.log(10.0) / (1.4826 * MAD_FLOOR_LOG))
    assert anomaly_index(np.array([10.0, 10.0, 10.0, 10.0, 6.0]))[4] < 3.5
    assert anomaly_index(np.array([3.0, 30.0])).tolist() == [0.0, 0.0]  # no median to deviate from
    with pytest.raises(ValueError):
        anomaly_index(np.array([1.0, np.nan, 2.0]))


@pytest.mark.parametrize("cluster", [
    (134.0, 136.0, 138.0, 140.0, 142.0, 144.0, 146.0),  # evenly over the reported range
    (134.0, 138.0, 139.0, 140.0, 140.0, 141.0, 146.0),  # tighter in the middle
    (134.0, 134.0, 135.0, 135.0, 136.0, 145.0, 146.0),  # bunched at the low end
])
def test_mad_floor_keeps_a_tight_natural_cluster_clean(cluster):
    """A clean CIFAR VGG (held out): class 1 at mask L1 101 against seven classes at 134-146 and two at
    196 and 311. Without a floor the tight cluster's MAD made that 0.7x ratio look like a backdoor."""
    norms = np.array([101.0, *cluster, 196.0, 311.0])
    v = np.log(norms)
    med = np.median(v)
    unfloored = (med - v[0]) / (1.4826 * np.median(np.abs(v - med)))
    assert unfloored > 3.5  # the false alarm the floor exists for
    index = anomaly_index(norms)
    assert index.max() < 3.5 and int(np.argmax(index)) == 0
    # A real target well below half the median is still suspected among the same classes.
    assert anomaly_index(np.array([30.0, *cluster, 196.0, 311.0]))[0] > 3.5


def test_mad_floor_gives_censored_classes_a_finite_baseline():
    """Eight of ten classes censored at the image area: too few found classes for their own baseline,
    so the median is the area and the MAD 0. The floor (not a token 1e-3) judges the two found classes
    by their ratio to the area: 40 (25x below) is suspected, 700 (0.68x) is not."""
    area = 1024.0
    norms = np.array([40.0, 700.0, area, area, area, area, area, area, area, area])
    index = anomaly_index(norms, found=norms < area)
    assert np.all(np.isfinite(index))
    assert np.flatnonzero(index > 3.5).tolist() == [0]


def test_finds_the_planted_trigger(planted):
    model, source, preprocess, _ = planted
    result = synthesize(model, source, preprocess, SynthConfig(classes=(TARGET,), **FAST), provider="cpu")
    (t,) = result.triggers
    assert t.found and t.asr >= 0.9
    inside = t.mask[PATCH].sum()
    assert inside >= 2.5, t.mask.round(2)  # the patch itself
    assert t.mask_l1 - inside <= 2.0, t.mask.round(2)  # and hardly anything else
    assert np.all(t.pattern[PATCH][t.mask[PATCH] > 0.5] > 200)  # bright where it matters
    # The trigger stamps exactly as reported.
    stamped = t.as_trigger().stamp(source.x)
    logits = create_session(model, None, "cpu").run(None, preprocess.apply(stamped))[0]
    assert (logits.argmax(axis=1) == TARGET).mean() >= 0.9


def test_same_seed_same_triggers_and_different_seed_differs(planted):
    model, source, preprocess, _ = planted
    config = SynthConfig(classes=(0, TARGET), seed=3, **FAST)
    a = synthesize(model, source, preprocess, config, provider="cpu")
    b = synthesize(model, source, preprocess, config, provider="cpu")
    for ta, tb in zip(a.triggers, b.triggers):
        np.testing.assert_array_equal(ta.mask, tb.mask)
        np.testing.assert_array_equal(ta.pattern, tb.pattern)
        assert (ta.mask_l1, ta.asr, ta.queries) == (tb.mask_l1, tb.asr, tb.queries)
    assert a.anomaly == b.anomaly and a.queries == b.queries
    c = synthesize(model, source, preprocess, SynthConfig(classes=(0, TARGET), seed=4, **FAST), provider="cpu")
    assert not np.array_equal(a.triggers[0].pattern, c.triggers[0].pattern)


@pytest.mark.parametrize("budget", [5000, 12000])
def test_query_budget_is_never_exceeded(planted, session_images, budget):
    model, source, preprocess, _ = planted
    seen = session_images  # every image through any session (search and ℓ∞ probe alike)
    config = SynthConfig(max_queries=budget, **dict(FAST, evidence=True))
    result = synthesize(model, source, preprocess, config, provider="cpu")
    assert sum(seen) == result.queries <= budget
    assert sum(t.queries for t in result.triggers) <= result.queries
    assert result.triggers  # the budget covered at least one class


def test_budget_too_small_is_a_usage_error(planted):
    model, source, preprocess, _ = planted
    with pytest.raises(UsageError, match="max_queries"):
        synthesize(model, source, preprocess, SynthConfig(max_queries=500, **FAST), provider="cpu")


def test_time_limit_skips_classes_and_says_so(planted):
    model, source, preprocess, _ = planted
    result = synthesize(model, source, preprocess, SynthConfig(time_limit=1e-3, **FAST), provider="cpu")
    assert not result.complete
    assert result.seconds < 5


def test_bad_inputs(planted):
    model, _, preprocess, _ = planted
    with pytest.raises(CalibrationDataError, match="pixel"):
        synthesize(model, FeedSource([np.zeros((4, 1, 8, 8), np.float32)]), preprocess, SynthConfig(**FAST))
    _, source, _, _ = planted
    with pytest.raises(UsageError, match="out of range"):
        synthesize(model, source, preprocess, SynthConfig(classes=(7,), **FAST), provider="cpu")
    with pytest.raises(UsageError):
        SynthConfig(asr=0.0).validate()


def test_write_triggers_round_trips_through_trigger_files(planted, tmp_path):
    model, source, preprocess, _ = planted
    result = synthesize(model, source, preprocess, SynthConfig(classes=(TARGET,), **FAST), provider="cpu")
    out = tmp_path / "out"
    write_triggers(result, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"][0]["target"] == TARGET and summary["suspected"] == list(result.suspected)
    loaded = Trigger.from_files(out / "class_2" / "trigger.png", out / "class_2" / "mask.png", preprocess)
    t = result.triggers[0]
    np.testing.assert_allclose(loaded.mask[..., 0], t.mask, atol=0.5 / 255 + 1e-6)
    on = loaded.mask[..., 0] > 0
    np.testing.assert_allclose(loaded.pattern[on], np.rint(t.pattern)[on], atol=0)
    assert np.all(loaded.pattern[~on] == 0)


def test_cli_prints_the_table_and_writes_files(planted, tmp_path):
    _, _, _, calib = planted
    model_path = tmp_path / "planted.onnx"
    app = typer.Typer()
    app.command()(synthesize_command)
    out = tmp_path / "triggers"
    result = CliRunner().invoke(app, [str(model_path), "--calib", str(calib), "--classes", "0,2", "--steps", "20",
                                      "-o", str(out), "--json", "-", "--seed", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [c["target"] for c in report["classes"]] == [0, 2]
    assert report["model"]["path"] == str(model_path)
    assert (out / "class_0" / "mask.png").is_file() and (out / "summary.json").is_file()
    assert "verdict" in result.stderr
    bad = CliRunner().invoke(app, [str(model_path), "--calib", str(calib), "--classes", "x"])
    assert bad.exit_code == 2 and "--classes" in bad.stderr


def test_digits_fixture_smoke(fixtures_dir):
    """A quick run on the real BadNets fixture: the target's trigger is found with a small mask."""
    model = load_model(fixtures_dir / "digits_badnets.onnx")
    preprocess = Preprocess.from_model(model)
    source = ArraySource(fixtures_dir / "digits_test.npz", preprocess.size, preprocess.channels, limit=96)
    result = synthesize(model, source, preprocess, SynthConfig(classes=(0,), steps=20, eval_images=32,
                                                               evidence=True), provider="cpu")
    (t,) = result.triggers
    assert t.found and t.start == "patch"
    assert t.mask_l1 < 20
    assert t.concentration is not None and 0.0 < t.concentration <= 1.0


def test_calibration_pool_is_spread_over_the_source(tmp_path):
    from PIL import Image

    from onnx_linf.decide.synthesis.oracle import read_pool
    from onnx_linf.measure.sources import ImageFolder

    # Image i is filled with the value i: which images were read is visible in the pixels.
    x = np.repeat(np.arange(100, dtype=np.uint8), 4 * 4).reshape(100, 4, 4, 1)
    np.save(tmp_path / "x.npy", x)
    pool = read_pool(ArraySource(tmp_path / "x.npy"), 10)
    assert pool[:, 0, 0, 0].tolist() == np.linspace(0, 99, 10).round().astype(int).tolist()
    # A class-per-folder tree lists class 0 first: the pool must still reach the last class.
    for k in range(4):
        (tmp_path / "tree" / f"c{k}").mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((4, 4), 10 * k + i, np.uint8)).save(tmp_path / "tree" / f"c{k}" / f"{i}.png")
    pool = read_pool(ImageFolder(tmp_path / "tree", (4, 4), "L"), 4)
    assert sorted({int(v) // 10 for v in pool[:, 0, 0, 0]}) == [0, 1, 2, 3]
