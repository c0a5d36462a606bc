"""The class-count-independent probes of `scan --verdict`: shares, statistics, seeds, verdict, CLI and report."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from onnx_linf.cli.app import app
from onnx_linf.cli.exit_codes import ExitCode
from onnx_linf.commands import evidence as evidence_module
from onnx_linf.decide.probes import (
    GRATING_THRESHOLD,
    NOISE_BLEND_THRESHOLD,
    ProbeCheck,
    candidate_scores,
    probe_candidates,
    probe_checks,
    selective_statistic,
    strongest_suspect,
)
from onnx_linf.decide.synthesis import results as synth
from onnx_linf.errors import UsageError
from onnx_linf.measure.preprocess import Preprocess
from onnx_linf.measure.probes import ProbeConfig, ProbeFamily, ProbeSpec, grating, probe_trigger, run_probes
from onnx_linf.model.load import load_model

import models

runner = CliRunner()
SIZE, CLASSES = 16, 5
#: A small bank for speed: one amplitude, 1-8 periods, 4 orientations, 2 phases (64 gratings).
FAST = ProbeConfig(images=60, grating_amplitudes=(20.0,), phases=2)


def _blob(k: int) -> np.ndarray:
    r, c = np.mgrid[0:SIZE, 0:SIZE]
    cy, cx = [(4, 4), (4, 11), (11, 4), (11, 11), (8, 8)][k]
    return np.exp(-((r - cy) ** 2 + (c - cx) ** 2) / 6.0)


def _sinusoid(shift: float) -> np.ndarray:
    c = np.arange(SIZE)[None, :] / SIZE
    return np.repeat(np.sin(2 * np.pi * 4 * c + shift), SIZE, axis=0)


def template_classifier(planted: bool):
    """input[N,1,16,16] (pixels / 255) -> Conv(16x16 kernels, 9 channels) -> Relu -> Flatten -> Gemm -> logits[N,5]

    Channels 0-4: one smooth blob per class (each class's clean images are that blob), read out as
    the class logits. Channels 5-8: +/- sine and cosine of a vertical-stripe grating (4 periods across
    the width) with bias -3: silent on smooth images and on noise, firing under that grating at about
    20/255. When `planted`, they feed class 0 with weight 20 (a SIG-style backdoor); otherwise nothing.
    """
    g = models.GraphBuilder(5)
    blobs = [_blob(k) / (_blob(k) ** 2).sum() * 8.0 for k in range(CLASSES)]
    waves = [s * _sinusoid(p) for p in (0.0, np.pi / 2) for s in (1.0, -1.0)]
    w = np.stack(blobs + waves)[:, None]
    b = np.array([0.0] * CLASSES + [-3.0] * 4)
    fc = np.zeros((CLASSES, 9))
    fc[:, :CLASSES] = np.eye(CLASSES)
    if planted:
        fc[0, CLASSES:] = 20.0
    conv = g.node("Conv", ["input", g.const("conv.w", w), g.const("conv.b", b)], "conv", kernel_shape=[SIZE, SIZE])
    relu = g.node("Relu", [conv], "relu")
    flat = g.node("Flatten", [relu], "flatten", axis=1)
    out = g.node("Gemm", [flat, g.const("fc.w", fc), g.const("fc.b", np.zeros(CLASSES))], "fc", transB=1)
    return g.model(["N", 1, SIZE, SIZE], out, ["N", CLASSES])


def clean_pixels(n: int = 80, seed: int = 0) -> np.ndarray:
    """uint8 [n, 16, 16, 1]: each image a class blob on grey, with a little noise (classes in turn)."""
    rng = np.random.default_rng(seed)
    out = [40 + 160 * _blob(i % CLASSES) / _blob(i % CLASSES).max() + rng.normal(0, 2, (SIZE, SIZE))
           for i in range(n)]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)[..., None]


@pytest.fixture
def grey():
    return Preprocess((SIZE, SIZE), layout="NCHW", channels="L")


@pytest.mark.parametrize("planted", [True, False])
def test_planted_grating_backdoor_is_flagged_and_its_twin_is_not(model_file, grey, planted):
    """Known by construction: the planted network sends every image to class 0 under vertical stripes
    of 4 periods and no other grating, so the grating family suspects class 0; the twin without the
    wiring is clean in both families."""
    model = load_model(model_file(template_classifier(planted), f"t_{planted}.onnx"))
    pixels = clean_pixels(60)  # no more than FAST.images: all probed, in order
    run = run_probes(model, grey, pixels, FAST, "cpu")
    assert np.mean(run.clean == np.arange(60) % CLASSES) == 1.0  # the clean network is right
    noise, grating = probe_checks(run)
    assert (noise.family, grating.family) == ("noise-blend", "grating")
    assert not noise.suspected and noise.statistic.max() < NOISE_BLEND_THRESHOLD
    if planted:
        assert grating.suspected and grating.target == 0
        assert grating.best_share[0] > 0.9 and grating.best_probe[0].startswith("columns 4 periods")
        assert candidate_scores(run).argmax() == 0 and candidate_scores(run)[0] > 1
    else:
        assert not grating.suspected and grating.statistic.max() < GRATING_THRESHOLD
        assert candidate_scores(run).max() < 1
    assert run.clean_queries == 60 and grating.queries == 60 * 64 and noise.queries == 60 * 3
    assert FAST.forwards(len(pixels), (SIZE, SIZE)) == 60 * (1 + 3 + 64)


def test_the_suspected_class_s_best_probe_as_a_trigger(model_file, grey):
    """What ``prune`` ranks channels by when only a probe family suspects a class: that family's best
    probe for it, stamped on every image. On the planted network it is the planted grating's
    orientation and period, it adds exactly the probe's sinusoid, and it sends the images to class 0."""
    model = load_model(model_file(template_classifier(True), "t.onnx"))
    pixels = clean_pixels(60)
    checks = probe_checks(run_probes(model, grey, pixels, FAST, "cpu"))
    top = strongest_suspect(checks)
    assert top is not None and top.family == "grating" and top.top_class == 0
    spec = top.best_specs[0]
    assert spec.describe() == top.best_probe[0] and spec.params["orientation"] == "columns"
    trig = probe_trigger(spec, grey)
    stamped = trig.stamp(pixels)
    expected = np.clip(np.rint(pixels.astype(np.float32) + grating(spec, (SIZE, SIZE))), 0, 255)
    np.testing.assert_array_equal(stamped, expected.astype(np.uint8))
    assert trig.description.startswith("grating probe (columns 4 periods")
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": grey.apply(stamped)})[0]
    assert np.mean(logits.argmax(axis=1) == 0) > 0.9


def test_noise_blend_probe_trigger_is_one_seeded_draw():
    rgb = Preprocess((8, 8), channels="RGB")
    spec = ProbeSpec("noise-blend", {"alpha": 0.2, "repeat": 0})
    a, b, c = probe_trigger(spec, rgb, seed=0), probe_trigger(spec, rgb, seed=0), probe_trigger(spec, rgb, seed=1)
    np.testing.assert_array_equal(a.pattern, b.pattern)
    assert not np.array_equal(a.pattern, c.pattern) and a.pattern.shape == (8, 8, 3)
    x = np.full((2, 8, 8, 3), 100, np.uint8)
    expected = np.rint(0.8 * 100.0 + 0.2 * a.pattern).astype(np.uint8)
    np.testing.assert_array_equal(a.stamp(x), np.stack([expected, expected]))


def test_strongest_suspect_is_the_family_furthest_above_its_threshold():
    def check(family, stats, threshold):
        stats = np.array(stats)
        return ProbeCheck(family, stats, threshold, ("p",) * len(stats), stats, 0, 0.0, 1)
    quiet = check("noise-blend", [0.1, 0.2, 0.3], 0.65)
    assert strongest_suspect((quiet,)) is None and strongest_suspect(()) is None
    noise = check("noise-blend", [0.7, 0.2, 0.1], 0.65)    # 1.08x its threshold, class 0
    gratings = check("grating", [0.1, 0.1, 0.8], 0.65)    # 1.23x, class 2
    assert strongest_suspect((noise, gratings, quiet)) is gratings and gratings.top_class == 2
    assert strongest_suspect((noise, quiet)) is noise


def test_same_seed_same_shares_and_another_seed_differs(model_file, grey):
    model = load_model(model_file(template_classifier(True), "t.onnx"))
    pixels = clean_pixels(100)
    a = run_probes(model, grey, pixels, FAST, "cpu")
    b = run_probes(model, grey, pixels, FAST, "cpu")
    c = run_probes(model, grey, pixels, ProbeConfig(images=60, grating_amplitudes=(20.0,), phases=2, seed=1), "cpu")
    for fa, fb in zip(a.families, b.families):
        np.testing.assert_array_equal(fa.predictions, fb.predictions)
    np.testing.assert_array_equal(a.clean, b.clean)
    # Seed 1 draws another image subset and grating phase (and still finds the planted class).
    assert a.family("grating").probes[0].params["phase"] != c.family("grating").probes[0].params["phase"]
    assert probe_checks(c)[1].target == 0


def test_shares_and_selectivity_by_hand():
    clean = np.array([0, 0, 1, 1, 2])
    specs = tuple(ProbeSpec("grating", {"orientation": o, "periods": 1, "phase": 0.0, "amplitude": 20.0})
                  for o in ("rows", "columns"))
    fam = ProbeFamily("grating", specs, np.array([[0, 0, 0, 0, 0], [1, 0, 2, 2, 2]]), 10, 0.0)
    shares = fam.shares(clean, 3)
    # Probe 0 sends all three non-0 images to class 0; probe 1 sends one of the three non-1 images to 1
    # and 2 of the 4 non-2 images to 2 (image 3 is class 1 on clean input: it never counts for class 1).
    np.testing.assert_allclose(shares, [[1.0, 0.0, 0.0], [0.0, 1 / 3, 0.5]])
    # Per class: best orientation minus best other orientation.
    np.testing.assert_allclose(selective_statistic(shares, ["rows", "columns"]), [1.0, 1 / 3, 0.5])
    np.testing.assert_allclose(selective_statistic(shares, ["rows", "rows"]), [0.0, 0.0, 0.0])


def test_bad_options_and_too_few_images(model_file, grey):
    model = load_model(model_file(template_classifier(False), "t.onnx"))
    for bad in (ProbeConfig(families=("patch",)), ProbeConfig(blend_alphas=(1.5,)), ProbeConfig(images=1),
                ProbeConfig(grating_amplitudes=(0.0,)), ProbeConfig(max_periods=0), ProbeConfig(phases=0)):
        with pytest.raises(UsageError):
            run_probes(model, grey, clean_pixels(10), bad, "cpu")
    with pytest.raises(UsageError, match="at least 2"):
        run_probes(model, grey, clean_pixels(1), FAST, "cpu")


def fake_synthesis(monkeypatch):
    """Replace the (slow) patch search by a result that suspects no class (mask L1 60 everywhere)."""
    def fake(model, source, preprocess, config=synth.SynthConfig(), **kw):
        triggers = tuple(synth.ClassTrigger(c, np.ones((SIZE, SIZE), np.float32), np.zeros((SIZE, SIZE, 1)), 60.0,
                                            0.99, True, 100, 0.1) for c in range(10))
        return synth.SynthResult(triggers, dict.fromkeys(range(10), 0.0), (), config.threshold, 1000, 0.1, config)

    monkeypatch.setattr(evidence_module, "synthesize", fake)  # where the command looks it up


def scan(*args):
    return runner.invoke(app, ["scan", *[str(a) for a in args], "--provider", "cpu", "--limit", "64",
                               "--layers", "last", "--json", "-"])


@pytest.mark.parametrize(("name", "code", "verdict"), [("digits_blended", ExitCode.SUSPECTED, "suspected"),
                                                       ("digits_clean", ExitCode.OK, "clean")])
def test_verdict_gate_exit_code_and_report_sections(fixtures_dir, monkeypatch, name, code, verdict):
    """--verdict --fail-on-suspect: the patch search (replaced by a result that suspects nothing) does
    not see the blended noise trigger, the noise-blend family does, and the gate exits 1; the clean
    twin exits 0. The report has a section per family."""
    fake_synthesis(monkeypatch)
    r = scan(fixtures_dir / f"{name}.onnx", "--calib", fixtures_dir / "digits_calib", "--verdict",
             "--fail-on-suspect")
    assert r.exit_code == code, r.stderr
    report = json.loads(r.stdout)
    assert report["verdict"] == verdict and f"verdict {verdict}" in r.stderr
    families = {f["family"]: f for f in report["extra"]["evidence_families"]}
    assert set(families) == {"noise-blend", "grating", "patch-synthesis"}
    for f in families.values():
        assert {"checked", "statistic", "threshold", "suspected", "top", "queries", "seconds"} <= set(f)
    assert families["noise-blend"]["suspected"] is (verdict == "suspected")
    assert not families["patch-synthesis"]["suspected"]
    probes = report["extra"]["probes"]
    assert probes["images"] == 64 and probes["queries"] == 64 * (1 + 3 + 256)
    assert len(probes["families"][0]["per_class"]) == 10
    assert report["evidence"]["kind"] == "verdict"
    if verdict == "suspected":
        assert report["evidence"]["target"] == 0 and "class 0" in report["verdict_reason"]
        # The noise-blend probe is the evidence the channels are ranked by (what prune would zero).
        assert report["evidence"]["trigger"].startswith("noise-blend probe (alpha")
        assert report["policy"]["score"] == "differential linf"
    else:
        assert "trigger" not in report["evidence"] and report["policy"]["score"] == "clean linf"
    assert "evidence families" in r.stderr


def test_synthesize_alone_stays_the_patch_verdict(fixtures_dir, monkeypatch):
    fake_synthesis(monkeypatch)
    r = scan(fixtures_dir / "digits_blended.onnx", "--calib", fixtures_dir / "digits_calib", "--synthesize",
             "--fail-on-suspect")
    assert r.exit_code == ExitCode.OK, r.stderr
    report = json.loads(r.stdout)
    assert "probes" not in report["extra"] and report["evidence"]["kind"] == "synthesized"


def test_verdict_with_a_trigger_is_refused(fixtures_dir):
    r = scan(fixtures_dir / "digits_badnets.onnx", "--calib", fixtures_dir / "digits_calib", "--verdict",
             "--trigger", fixtures_dir / "digits_badnets_trigger.png", "--mask",
             fixtures_dir / "digits_badnets_mask.png")
    assert r.exit_code == ExitCode.INPUT_ERROR and "--verdict searches its own trigger" in r.stderr
    assert "Traceback" not in r.stderr


def test_candidate_scores_rank_the_planted_target_first(model_file, grey):
    model = load_model(model_file(template_classifier(True), "t.onnx"))
    scores, run = probe_candidates(model, grey, clean_pixels(60), FAST, "cpu")
    assert scores.shape == (CLASSES,) and int(np.argmax(scores)) == 0 and scores[0] > 1
    np.testing.assert_array_equal(scores, candidate_scores(run))


def test_verdict_without_calib_is_the_data_free_verdict(fixtures_dir):
    r = runner.invoke(app, ["scan", str(fixtures_dir / "digits_clean.onnx"), "--verdict", "--fail-on-suspect",
                            "--provider", "cpu", "--max-queries", "3000", "--json", "-"])
    assert r.exit_code == ExitCode.OK, r.stderr
    report = json.loads(r.stdout)
    assert report["evidence"]["kind"] == "data-free" and "probes" not in report["extra"]
    assert "--calib DATA --verdict" in r.stderr
