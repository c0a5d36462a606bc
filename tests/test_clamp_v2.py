"""Clamp v2 end to end: fold-pure one-pass statistics, exact merges, the strength rule, the
cross-fit's determinism, the score output, and the default clamp on the digits fixtures."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from onnx_linf.cli.app import app
from onnx_linf.commands.clamp import ClampConfig, clamp
from onnx_linf.decide.strength import (
    LOW_THRESHOLD_FLOOR,
    SCORE_SCALE_FLOOR,
    StrengthRow,
    choose,
    exceeded,
    gate_threshold,
    held_out_row,
    low_gate_threshold,
    part_scales,
    tolerance_rank,
)
from onnx_linf.errors import UsageError
from onnx_linf.measure.calibrate import model_tensor
from onnx_linf.measure.folds import FoldedSource, measure_folds
from onnx_linf.measure.preprocess import Preprocess
from onnx_linf.measure.probe import Probe
from onnx_linf.measure.session import create_session
from onnx_linf.measure.sources import ArraySource, FeedSource
from onnx_linf.measure.stats import TopK
from onnx_linf.model.load import load_model
from onnx_linf.model.taps import find_taps
from onnx_linf.rewrite.clamp import SCORE_FLOOR, SCORE_OUTPUT

import models

runner = CliRunner()


def feed(n: int, seed: int = 0) -> FeedSource:
    return FeedSource([np.random.default_rng(seed).normal(0, 1, (n, 3, 8, 8)).astype(np.float32)])


@pytest.mark.parametrize("batch_size", [1, 3, 7, 64])
def test_folded_batches_are_fold_pure_and_cover_every_image_once(batch_size):
    source = feed(23)
    seen = []
    for batch in FoldedSource(source, 5).batches(batch_size):
        assert (batch.indices % 5 == batch.fold).all()
        assert len(batch) <= max(batch_size, 1)
        np.testing.assert_array_equal(batch.tensor, source.x[batch.indices])
        seen.extend(batch.indices.tolist())
    assert sorted(seen) == list(range(23))
    only = [i for b in FoldedSource(source, 5, only=2).batches(batch_size) for i in b.indices]
    assert only == list(range(2, 23, 5)) and len(FoldedSource(source, 5, only=2)) == 5


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(6, 30), folds=st.integers(2, 5), batch=st.integers(1, 9))
def test_fold_statistics_merge_to_the_one_pass_result(tmp_path_factory, n, folds, batch):
    """Per-fold statistics merged equal one pass over all images: exactly for extremes and top-k."""
    path = tmp_path_factory.mktemp("m") / "m.onnx"
    onnx.save(models.nhwc_input(), path)
    model = load_model(path)
    taps = find_taps(model, "all")
    per_tap = {t.name: ("pos_top", "img_mean", "img_pmean") for t in taps}
    probe = Probe(model, taps, ("linf",), "cpu", per_tap_stats=per_tap)
    x = np.random.default_rng(n).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    np.save(path.parent / "x.npy", x)
    pp = Preprocess.from_model(model)
    source = ArraySource(path.parent / "x.npy", pp.size, pp.channels)
    one = probe.measure(source, pp, batch)
    k = n  # keep every per-image value: the merged top-k must then hold all of them
    folded = measure_folds(probe, source, pp, batch, folds, image_topk=k)
    merged = folded.merged()
    for tap in taps:
        a, b = one[tap.name], merged[tap.name]
        np.testing.assert_array_equal(a.top["pos_top"].kth(), b.top["pos_top"].kth())
        for stat in ("img_mean", "img_pmean"):
            assert np.sort(b.top[stat].values, axis=0).shape[0] == n
            np.testing.assert_array_equal(a.top[stat].kth(), np.sort(b.top[stat].values, axis=0)[-1])
        np.testing.assert_allclose(a.moments["linf"].mean, b.moments["linf"].mean, rtol=1e-12)
        assert b.moments["linf"].count == n
    # The model's own predictions, in source order, come with the pass.
    logits = create_session(model, None, "cpu").run(None, pp.apply(x))[0]
    np.testing.assert_array_equal(folded.predictions, logits.argmax(-1))
    assert folded.images(exclude=0) == n - len(range(0, n, folds))


def test_topk_kth_of_fewer_images_is_an_exact_order_statistic():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(50, 4))
    acc = TopK(20, largest=True)
    for chunk in np.array_split(values, 7):
        acc.update(chunk)
    for k in (1, 5, 20):
        np.testing.assert_array_equal(acc.kth(k), np.sort(values, axis=0)[-k])


def rows(costs: dict[float, float]) -> list[StrengthRow]:
    return [StrengthRow(q, c, c, 0.0) for q, c in costs.items()]


def test_strength_rule_takes_the_unbroken_run_from_100():
    done = rows({100.0: 0.01, 99.0: 0.012, 98.0: 0.03, 97.0: 0.011})
    assert choose(done, "softmax", 0.005).quantile == 99.0  # 97 passes only after 98 failed: noise
    assert exceeded(done[:3], "softmax", 0.005) and not exceeded(done[:2], "softmax", 0.005)
    assert choose(rows({100.0: 0.0, 99.0: 0.5}), "change", 0.01).quantile == 100.0
    with pytest.raises(UsageError, match="rule"):
        choose(done, "labels")
    with pytest.raises(UsageError, match="100"):
        choose(rows({99.0: 0.0}))


def decisions(strength: dict) -> dict:
    """The strength section without the probes' wall time (the only value that may differ between runs)."""
    out = json.loads(json.dumps(strength))
    probes = out.get("gate", {}).get("suspects", {}).get("probes", {})
    for timed in [probes, *probes.get("families", [])]:
        timed.pop("seconds", None)
    return out


def test_cross_fit_is_deterministic_and_reported(model_file, pixels_file):
    path = model_file(models.plain_cnn())
    calib = pixels_file(40, 8, 8, 3)
    a = clamp(path, calib, ClampConfig(provider="cpu", batch_size=6))
    b = clamp(path, calib, ClampConfig(provider="cpu", batch_size=6))
    assert decisions(a.report.strength) == decisions(b.report.strength)
    assert a.proto.SerializeToString() == b.proto.SerializeToString()
    s = a.report.strength
    assert s["mode"] == "auto" and s["folds"] == 5 and s["candidates"][0]["quantile"] == 100.0
    assert s["quantile"] in [c["quantile"] for c in s["candidates"]]
    assert [m.mean_bound for m in a.report.maps] == [None, "mean"]  # the first conv map keeps the clamp only


def test_score_output_is_zero_on_the_calibration_images_at_strength_100(model_file, pixels_file):
    path = model_file(models.resnet_block())
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    calib = pixels_file(24, 8, 8, 3)
    result = clamp(path, calib, ClampConfig(provider="cpu", strength=100.0, score_output=True))
    assert [o.name for o in result.proto.graph.output][-1] == SCORE_OUTPUT
    assert result.report.verification["ok"]
    model = load_model(path)
    pp = Preprocess.from_model(model)
    x = pp.apply(np.load(calib))
    out = create_session(model, result.proto, "cpu").run(None, x)
    # The documented floor: 0 up to float rounding (ORT fuses the rewritten graph differently, so a
    # map can come out an ulp above the maximum it was measured at).
    assert out[-1].shape == (24,) and (out[-1] >= 0).all() and (out[-1] < SCORE_FLOOR).all()
    bright = create_session(model, result.proto, "cpu").run(None, x * 5)[-1]
    assert bright.shape == (24,) and (bright > 0).all()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_part_scales_are_floored_99th_percentiles_and_the_score_their_largest_ratio():
    rng = np.random.default_rng(3)
    parts = np.column_stack([rng.uniform(0, 1, 200), np.zeros(200), rng.uniform(0, 10, 200)])
    parts[7, 1] = 0.2  # a part that is almost always 0: its scale is the floor, not ~0
    scales, scores = part_scales(parts)
    np.testing.assert_allclose(scales[[0, 2]], np.quantile(parts[:, [0, 2]], 0.99, axis=0, method="inverted_cdf"))
    assert scales[1] == SCORE_SCALE_FLOOR
    np.testing.assert_allclose(scores, (parts / scales).max(axis=1))
    assert scores[7] == pytest.approx(max(0.2 / SCORE_SCALE_FLOOR, *(parts[7, [0, 2]] / scales[[0, 2]])))


def test_gate_threshold_is_a_tolerance_bound_on_the_held_out_scores():
    """The k-th largest of n held-out scores: P(alarm rate on new images > alarm) <= 5%, whatever the
    distribution (checked by simulation on a heavy-tailed one), and the largest when n is small."""
    assert tolerance_rank(1000, 0.003) == (1, pytest.approx(1 - 0.997 ** 1000))
    assert tolerance_rank(500, 0.003)[0] == 1 and tolerance_rank(500, 0.003)[1] < 0.8  # too few: reported
    k, reached = tolerance_rank(5000, 0.003)
    assert k == 9 and reached >= 0.95
    rng = np.random.default_rng(0)
    misses = 0
    for _ in range(400):  # Pareto tail: the true exceedance of the k-th largest is 1 - F(x) = x^-a
        scores = rng.pareto(1.5, 5000) + 1
        row = StrengthRow(100.0, 0.0, 0.0, 0.0, held_out_mean_scores=tuple(scores))
        threshold, confidence = gate_threshold(row, 0.003)
        assert threshold == np.sort(scores)[-9] and confidence == reached
        misses += threshold ** -1.5 > 0.003
    assert misses / 400 <= 0.05 + 0.03  # 95% confidence, within Monte Carlo noise
    assert np.isnan(gate_threshold(StrengthRow(100.0, 0.0, 0.0, 0.0), 0.003)[0])
    with pytest.raises(ValueError):
        tolerance_rank(0, 0.003)


def test_auto_clamp_scales_each_score_part_by_its_held_out_percentile(model_file, pixels_file):
    path = model_file(models.resnet_block())
    calib = pixels_file(40, 8, 8, 3)
    result = clamp(path, calib, ClampConfig(provider="cpu", batch_size=8, score_output=True))
    score = result.report.score
    parts = [kind for r in result.records for kind in r.score_parts]
    assert [p["kind"] for p in score["parts"]] == parts and len(parts) >= 3
    assert all(p["scale"] >= SCORE_SCALE_FLOOR for p in score["parts"])
    assert "score_scales" not in result.report.strength["candidates"][0]
    model = load_model(path)
    x = Preprocess.from_model(model).apply(np.load(calib)) * 3
    deployed = create_session(model, result.proto, "cpu").run([SCORE_OUTPUT], x)[0]
    assert deployed.shape == (40,) and (deployed > 1.0).mean() > 0.5  # 3x brighter images leave the clean range
    assert score["threshold_1pct"] is not None and score["threshold_1pct"] >= 0
    dist = score["held_out_distribution"]
    assert dist["images"] == 40 and dist["p50"] <= dist["p90"] <= dist["p99"] <= dist["max"]
    assert dist["p99"] == pytest.approx(score["threshold_1pct"])


def test_score_gate_is_cross_fitted_and_reported(model_file, pixels_file):
    path = model_file(models.resnet_block())
    calib = pixels_file(40, 8, 8, 3)
    a = clamp(path, calib, ClampConfig(provider="cpu", batch_size=8, gate=50.0, suspects="none"))
    b = clamp(path, calib, ClampConfig(provider="cpu", batch_size=8, gate=50.0, suspects="none"))
    gate = a.report.strength["gate"]
    assert decisions(a.report.strength) == decisions(b.report.strength)
    assert a.proto.SerializeToString() == b.proto.SerializeToString()
    assert gate["quantile"] == 50.0 and isinstance(gate["kept"], bool) and gate["tried"]
    assert gate["tried"][0]["quantile"] == gate["strength_without_gate"]
    if gate["kept"]:  # deployed at the strength where the gated rewrite fitted the budget
        assert gate["tried"][-1]["quantile"] == a.report.strength["quantile"] and gate["threshold"] >= 0
        assert gate["alarms"] == [0.01, 0.005] and gate["alarm"] == gate["tried"][-1]["alarm"]
        # 40 held-out images: both alarms give the largest score, so only the first is tried per strength
        assert gate["confidence"] == pytest.approx(1 - 0.99 ** 40)
        assert [t["alarm"] for t in gate["tried"]] == [0.01] * len(gate["tried"])
    assert a.report.strength["forwards"] == 40 * (1 + len(a.report.strength["candidates"]) + len(gate["tried"]))
    has_gate_nodes = any("gate_hit" in o for n in a.proto.graph.node for o in n.output)
    assert has_gate_nodes == gate["kept"]
    fixed = clamp(path, calib, ClampConfig(provider="cpu", batch_size=8, gate=50.0, strength=99.0))
    assert any("score gate left out" in n for n in fixed.report.notes)


def test_fixed_strength_cuts_the_blended_backdoor_of_the_digits_fixture(fixtures_dir):
    """Today's clamp leaves digits Blended at 100% ASR; the channel-mean bound (q 99, p 6) cuts it
    (measured 29%: the digits model is the hard case, see the README)."""
    from onnx_linf.measure.accuracy import evaluate, open_labelled
    from onnx_linf.measure.preprocess import Trigger

    model = load_model(fixtures_dir / "digits_blended.onnx")
    pp = Preprocess.from_model(model)
    trig = Trigger.from_files(fixtures_dir / "digits_blended_trigger.png", fixtures_dir / "digits_blended_mask.png", pp)
    test = open_labelled(fixtures_dir / "digits_test.npz", pp)
    result = clamp(model, fixtures_dir / "digits_calib", ClampConfig(provider="cpu", strength=99.0))
    before = evaluate(model, test, pp, trigger=trig, target=0, provider="cpu")
    after = evaluate(model, test, pp, trigger=trig, target=0, provider="cpu", proto=result.proto)
    assert before.asr >= 0.99 and after.asr <= 0.4
    assert after.accuracy >= before.accuracy - 0.01


def test_low_evidence_gates_the_digits_blended_backdoor(fixtures_dir):
    """The default clamp reads channel means falling below their clean minimum too: on the digits
    Blended fixture (a trigger that mostly suppresses) its gate takes the ASR from 11.7% without that
    evidence to 4.3% (measured), at no accuracy cost; the report says which parts the score has."""
    from onnx_linf.measure.accuracy import evaluate, open_labelled
    from onnx_linf.measure.preprocess import Trigger

    model = load_model(fixtures_dir / "digits_blended.onnx")
    pp = Preprocess.from_model(model)
    trig = Trigger.from_files(fixtures_dir / "digits_blended_trigger.png", fixtures_dir / "digits_blended_mask.png", pp)
    test = open_labelled(fixtures_dir / "digits_test.npz", pp)
    before = evaluate(model, test, pp, trigger=trig, target=0, provider="cpu")
    after = {}
    for low in (True, False):
        result = clamp(model, fixtures_dir / "digits_calib",
                       ClampConfig(provider="cpu", score_output=True, low_evidence=low))
        assert result.report.config["low_evidence"] is low
        assert result.report.config["evidence_quantile"] is None
        kinds = [p["kind"] for p in result.report.score["parts"]]
        assert kinds.count("low") == (kinds.count("mean") if low else 0) and kinds.count("mean") == 2
        assert result.report.strength["gate"]["kept"]
        after[low] = evaluate(model, test, pp, trigger=trig, target=0, provider="cpu", proto=result.proto)
    assert after[True].asr <= 0.07 and after[False].asr >= 0.09
    assert after[True].accuracy >= before.accuracy - 0.005


def test_identity_verification_leaves_out_the_images_the_graded_gate_flags(model_file, pixels_file):
    """At strength 100 a graded gate (evidence against the clean q 99.5) can flag calibration images;
    the identity is verified on the others, the report says how many were left out, and the images
    left out are exactly those whose outputs changed."""
    path = model_file(models.plain_cnn())
    calib = pixels_file(1000, 8, 8, 3)
    config = ClampConfig(provider="cpu", strength_grid=(100.0,), gate_alarm=0.2, slack=0.5, verify_images=1000,
                         suspects="none", evidence_quantile=99.5)
    result = clamp(path, calib, config)
    assert result.report.strength["quantile"] == 100.0 and result.report.strength["gate"]["kept"]
    assert result.report.verification["ok"]
    note = next(n for n in result.report.notes if n.startswith("verified as the identity"))
    gated = int(note.split("flagged ")[1].split(",")[0])
    assert 0 < gated < 100
    model = load_model(path)
    x = Preprocess.from_model(model).apply(np.load(calib))
    before = create_session(model, None, "cpu").run(None, x)[0]
    after = create_session(model, result.proto, "cpu").run(None, x)[0]
    changed = ~np.isclose(after, before, rtol=1e-4, atol=1e-4).all(axis=1)
    assert changed.sum() == gated


def test_gate_evidence_is_scored_against_the_fold_fitted_bounds(fixtures_dir):
    """auto: each channel-mean part is scored against the average of the five fold-fitted bounds (what
    the gate's threshold was calibrated on), never above the deployed bound; off on request."""
    from onnx.numpy_helper import to_array

    def consts(proto, what):
        return {i.name.split("/")[-1]: to_array(i) for i in proto.graph.initializer if f"/{what}/" in i.name}

    model = load_model(fixtures_dir / "digits_blended.onnx")
    on = clamp(model, fixtures_dir / "digits_calib", ClampConfig(provider="cpu"))
    off = clamp(model, fixtures_dir / "digits_calib", ClampConfig(provider="cpu", fold_reference=False))
    assert on.report.config["fold_reference"] is True and off.report.config["fold_reference"] is False
    refs, his = consts(on.proto, "mean_ref"), consts(on.proto, "mean_hi")
    assert len(refs) == len(his) == 2 and not consts(off.proto, "mean_ref")
    for tap, ref in refs.items():
        assert (ref <= his[tap]).all() and (ref < his[tap]).any()


def test_low_gate_threshold_is_the_largest_held_out_sum_with_a_floor():
    row = StrengthRow(100.0, 0.0, 0.0, 0.0, held_out_low_scores=(0.0, 2.5, 0.3, float("nan")))
    assert low_gate_threshold(row) == 2.5
    assert low_gate_threshold(StrengthRow(100.0, 0.0, 0.0, 0.0, held_out_low_scores=(0.0,) * 5)) == LOW_THRESHOLD_FLOOR
    assert low_gate_threshold(StrengthRow(100.0, 0.0, 0.0, 0.0)) is None
    # held_out_row sums each side's scaled parts on its own (columns: mean, low, position per map).
    parts = np.array([[0.1, 0.0, 0.0, 0.2, 0.4, 0.0], [0.0, 0.3, 0.5, 0.0, 0.0, 0.1]] * 50)
    above = np.array([True, False, False, True, False, False])
    below = np.array([False, True, False, False, True, False])
    probs = np.full((100, 2), 0.5)
    row = held_out_row(100.0, probs, np.zeros(100, int), np.zeros(100, int), parts, above, below)
    scales = np.maximum(np.quantile(parts, 0.99, axis=0, method="inverted_cdf"), SCORE_SCALE_FLOOR)
    np.testing.assert_allclose(row.held_out_mean_scores[:2], (parts[:2, above] / scales[above]).sum(axis=1))
    np.testing.assert_allclose(row.held_out_low_scores[:2], (parts[:2, below] / scales[below]).sum(axis=1))


def test_cli_reports_strength_maps_and_score(fixtures_dir, tmp_path):
    r = runner.invoke(app, ["clamp", str(fixtures_dir / "digits_badnets.onnx"), "--calib",
                            str(fixtures_dir / "digits_calib"), "-o", str(tmp_path / "s.onnx"), "--strength", "99",
                            "--score-output", "--json", "-", "-q"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["strength"] == {"mode": "fixed", "quantile": 99.0, "power": 6.0}
    assert report["config"]["evidence_quantile"] is None  # graded evidence needs the cross-fit
    assert report["config"]["bounds"] == ["position", "channel-mean"]
    assert [m["mean_bound"] for m in report["maps"]] == [None, "mean", "mean"]
    assert report["score"]["output"] == SCORE_OUTPUT
    assert [o.name for o in onnx.load(tmp_path / "s.onnx").graph.output][-1] == SCORE_OUTPUT
    bad = runner.invoke(app, ["clamp", str(fixtures_dir / "digits_badnets.onnx"), "--calib",
                              str(fixtures_dir / "digits_calib"), "-o", str(tmp_path / "t.onnx"), "--bounds", "mean"])
    assert bad.exit_code == 2 and "--bounds" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "t.onnx").exists()
    bad = runner.invoke(app, ["clamp", str(fixtures_dir / "digits_badnets.onnx"), "--calib",
                              str(fixtures_dir / "digits_calib"), "-o", str(tmp_path / "t.onnx"), "--strength", "x"])
    assert bad.exit_code == 2 and "--strength" in bad.stderr
    for gate in ("sometimes", "0"):
        bad = runner.invoke(app, ["clamp", str(fixtures_dir / "digits_badnets.onnx"), "--calib",
                                  str(fixtures_dir / "digits_calib"), "-o", str(tmp_path / "t.onnx"), "--gate", gate])
        assert bad.exit_code == 2 and "--gate" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_gate_on_by_default_and_off_on_request(fixtures_dir, tmp_path):
    args = ["clamp", str(fixtures_dir / "digits_blended.onnx"), "--calib", str(fixtures_dir / "digits_calib"),
            "--json", "-", "-q"]
    on = json.loads(runner.invoke(app, args + ["-o", str(tmp_path / "a.onnx")]).stdout)
    off = json.loads(runner.invoke(app, args + ["-o", str(tmp_path / "b.onnx"), "--gate", "off"]).stdout)
    assert on["strength"]["gate"]["quantile"] == "mean" and on["strength"]["gate"]["alarm"] == 0.01
    assert "gate" not in off["strength"]
    assert on["strength"]["forwards"] > off["strength"]["forwards"]  # the gate's held-out pass(es)


def test_cli_evidence_options(fixtures_dir, tmp_path):
    args = ["clamp", str(fixtures_dir / "digits_blended.onnx"), "--calib", str(fixtures_dir / "digits_calib"),
            "--json", "-", "-q"]
    r = runner.invoke(app, args + ["-o", str(tmp_path / "a.onnx"), "--no-low-evidence", "--evidence-quantile", "bound",
                                   "--score-output"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["config"]["low_evidence"] is False and report["config"]["evidence_quantile"] is None
    assert "low" not in [p["kind"] for p in report["score"]["parts"]]
    for bad in ("100", "x"):
        r = runner.invoke(app, args + ["-o", str(tmp_path / "b.onnx"), "--evidence-quantile", bad])
        assert r.exit_code == 2 and "--evidence-quantile" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "b.onnx").exists()


def test_model_tensor_of_a_fold_batch_is_the_rows_of_the_source():
    source = feed(10)
    batch = next(iter(FoldedSource(source, 3).batches(10)))
    np.testing.assert_array_equal(model_tensor(batch, Preprocess((8, 8))), source.x[batch.indices])


def test_too_few_images_to_cross_fit_bound_at_their_maximum(model_file, pixels_file):
    """4 images cannot fill 5 folds: auto falls back to strength 100 (the identity on them), says so."""
    result = clamp(model_file(models.plain_cnn()), pixels_file(4, 8, 8, 3), ClampConfig(provider="cpu"))
    assert result.report.strength == {"mode": "fixed", "quantile": 100.0, "power": 6.0}
    assert any("too few to cross-fit" in n for n in result.report.notes)
    assert result.report.verification["ok"] and result.report.calibration_agreement == 1.0


def test_cli_excess_folds_at_q100_clips_below_and_refuses_unknown_values(fixtures_dir, tmp_path):
    args = ["clamp", str(fixtures_dir / "digits_badnets.onnx"), "--calib", str(fixtures_dir / "digits_calib"),
            "--json", "-", "-q", "--bounds", "position"]
    default = json.loads(runner.invoke(app, args + ["-o", str(tmp_path / "a.onnx")]).stdout)
    lower = json.loads(runner.invoke(app, args + ["-o", str(tmp_path / "b.onnx"), "--quantile", "99"]).stdout)
    forced = json.loads(runner.invoke(app, args + ["-o", str(tmp_path / "c.onnx"), "--quantile", "99",
                                                   "--excess", "fold"]).stdout)
    assert (default["config"]["excess"], lower["config"]["excess"], forced["config"]["excess"]) == ("fold", "clip",
                                                                                                     "fold")
    ops = [n.op_type for n in onnx.load(tmp_path / "a.onnx").graph.node]
    assert ops.count("Sub") == ops.count("Min") == 3  # one fold per map (digits: 3 maps)
    bad = runner.invoke(app, args + ["-o", str(tmp_path / "d.onnx"), "--excess", "reflect"])
    assert bad.exit_code == 2 and "--excess must be" in bad.output and not (tmp_path / "d.onnx").exists()


def test_gate_output_names_exactly_the_images_the_gate_changes(model_file, pixels_file):
    """--gate-output: the exported model gains the bool [N] output onnx_linf_gated, its logits are those
    of the model without it, and at strength 100 the images it names are exactly those whose outputs
    differ from the original's (the gate's response is the only change there)."""
    from onnx_linf.rewrite.clamp import GATED_OUTPUT

    path = model_file(models.plain_cnn())
    calib = pixels_file(1000, 8, 8, 3)
    config = ClampConfig(provider="cpu", strength_grid=(100.0,), gate_alarm=0.2, slack=0.5, evidence_quantile=99.5,
                         suspects="none")
    plain = clamp(path, calib, config)
    result = clamp(path, calib, dataclasses.replace(config, gate_output=True))
    assert result.report.verification["ok"] and result.report.strength["gate"]["output"] == GATED_OUTPUT
    assert [o.name for o in result.proto.graph.output] == [o.name for o in plain.proto.graph.output] + [GATED_OUTPUT]
    model = load_model(path)
    x = Preprocess.from_model(model).apply(np.load(calib))
    logits, gated = create_session(model, result.proto, "cpu").run(None, x)
    assert gated.dtype == np.bool_ and gated.shape == (1000,)
    np.testing.assert_array_equal(logits, create_session(model, plain.proto, "cpu").run(None, x)[0])
    before = create_session(model, None, "cpu").run(None, x)[0]
    changed = ~np.isclose(logits, before, rtol=1e-4, atol=1e-4).all(axis=1)
    assert 0 < gated.sum() < 1000 and np.array_equal(changed, gated)


def test_gate_output_is_refused_where_no_gate_is_kept(model_file, pixels_file, fixtures_dir, tmp_path):
    for bad in (dict(strength=99.0), dict(gate=None), dict(bounds=("position",))):
        with pytest.raises(UsageError, match="--gate-output needs the score gate"):
            ClampConfig(gate_output=True, **bad).validate()
    path = model_file(models.plain_cnn())
    calib = pixels_file(1000, 8, 8, 3)
    out = tmp_path / "never.onnx"
    with pytest.raises(UsageError, match="the score gate was left out"):  # 20% gated cannot fit a zero budget
        clamp(path, calib, ClampConfig(provider="cpu", strength_grid=(100.0,), gate_alarm=0.2, slack=0.0,
                                       suspects="none", gate_output=True), output=out)
    assert not out.exists()
    r = runner.invoke(app, ["clamp", str(fixtures_dir / "digits_blended.onnx"), "--calib",
                            str(fixtures_dir / "digits_calib"), "-o", str(tmp_path / "x.onnx"), "--gate-output",
                            "--strength", "99"])
    assert r.exit_code == 2 and "--gate-output needs the score gate" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.onnx").exists()


def test_gate_falls_back_to_the_smaller_alarm_where_the_larger_fits_no_strength(model_file, pixels_file):
    """Alarms are tried largest first at each strength: 20% gated cannot fit a zero budget, the
    largest held-out score (no held-out image above it) can, at the same strength."""
    path = model_file(models.plain_cnn())
    calib = pixels_file(1000, 8, 8, 3)
    result = clamp(path, calib, ClampConfig(provider="cpu", strength_grid=(100.0,), gate_alarm=(0.002, 0.2),
                                            suspects="none", slack=0.0))
    gate = result.report.strength["gate"]
    assert gate["alarms"] == [0.2, 0.002] and [t["alarm"] for t in gate["tried"]] == [0.2, 0.002]
    assert gate["kept"] and gate["alarm"] == 0.002 and gate["threshold"] == gate["tried"][1]["threshold"]
    assert gate["tried"][0]["estimated_drop"] > gate["tried"][1]["estimated_drop"]
    assert gate["tried"][0]["threshold"] < gate["threshold"]
    assert gate["confidence"] == pytest.approx(1 - 0.998 ** 1000)


def test_cli_gate_alarm_takes_a_list(fixtures_dir, tmp_path):
    args = ["clamp", str(fixtures_dir / "digits_blended.onnx"), "--calib", str(fixtures_dir / "digits_calib"),
            "-o", str(tmp_path / "a.onnx"), "--json", "-", "-q"]
    r = runner.invoke(app, args + ["--gate-alarm", "0.002,0.3"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["strength"]["gate"]["alarms"] == [0.3, 0.002]
    for bad in ("0.6", "x", ""):
        r = runner.invoke(app, args + ["--force", "--gate-alarm", bad])
        assert r.exit_code == 2 and ("--gate-alarm" in r.output or "false-alarm shares" in r.output), r.output
        assert "Traceback" not in r.output


def test_report_names_the_strength_the_gate_raised_to(model_file, pixels_file):
    """Where the gated rewrite does not fit the budget at the chosen strength, the strength is raised
    (here q 70 -> 100: held-out costs 1.8% at q 70, 2.0% gated, 0.3% gated at q 100, budget 0.15% +
    1.75%) and the report's strength is the deployed one, not the one chosen without the gate."""
    path = model_file(models.plain_cnn())
    calib = pixels_file(1000, 8, 8, 3)
    result = clamp(path, calib, ClampConfig(provider="cpu", strength_grid=(100.0, 70.0), gate_alarm=0.05,
                                            suspects="none", slack=0.0175))
    s = result.report.strength
    assert s["gate"]["kept"] and s["gate"]["strength_without_gate"] == 70.0
    assert [t["quantile"] for t in s["gate"]["tried"]] == [70.0, 100.0] and s["quantile"] == 100.0
    assert result.report.verification is not None  # q 100 again: verified as the identity
