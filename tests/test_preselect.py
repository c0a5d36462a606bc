"""Pre-selection of candidate target classes on a many-class model: picks, report, budget, determinism."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from onnx_linf.cli.app import app
from onnx_linf.cli.synthesize import synthesize_command
from onnx_linf.decide.synthesis.preselect import baseline_weights, preselect
from onnx_linf.decide.synthesis.results import SynthConfig
from onnx_linf.decide.synthesis.synthesize import synthesize
from onnx_linf.decide.synthesis.verdict import anomaly_index
from onnx_linf.errors import UsageError

import models

CLASSES = 20
TARGET = 13
FAST = dict(steps=20, pairs=8, batch=8, eval_images=32, patch_steps=4, patch_windows=2, patch_samples=8,
            evidence=False, candidates=2, references=2)


def many_class_model():
    """input[N,1,8,8] -> Conv(2x2) -> Relu -> Flatten -> Gemm -> logits[N,20] with a planted class 13.

    As `test_synthesize.planted_model`: logit 13 is ``20 * mean(2x2 patch at (5, 5)) - 15``, positive
    only when that patch is nearly white; each of the 19 other logits is the mean brightness of a
    fixed random half of the pixels (seeded), so clean images spread over them, never reach class 13,
    and reaching one of them takes brightening many pixels.
    """
    fc = np.zeros((CLASSES, 2, 7, 7))
    rng = np.random.default_rng(5)
    fc[:, 1] = (rng.random((CLASSES, 7, 7)) < 0.5) / 25.0 + rng.normal(0.0, 0.01, (CLASSES, 7, 7))
    fc[TARGET] = 0.0
    fc[TARGET, 0, 5, 5] = 20.0
    bias = np.zeros(CLASSES)
    bias[TARGET] = -15.0
    return models.patch_classifier(fc, bias)


@pytest.fixture
def many(model_file, tmp_path):
    return models.grey_calibration(model_file(many_class_model(), "many.onnx"), tmp_path)


def test_preselection_picks_the_planted_target_and_reports_the_rest(many):
    model, source, preprocess, _ = many
    result = synthesize(model, source, preprocess, SynthConfig(**FAST), provider="cpu")
    pre = result.preselection
    assert pre is not None and pre.num_classes == CLASSES == result.num_classes
    assert pre.candidates[0] == TARGET and pre.rank("patch_scan", TARGET) == 1
    assert len(pre.candidates) == 2 and len(pre.references) == 2
    assert not set(pre.candidates) & set(pre.references)
    searched = [t.target for t in result.triggers]
    assert searched == sorted(pre.candidates + pre.references)
    assert result.complete
    assert set(result.not_examined) == set(range(CLASSES)) - set(searched)
    assert set(result.not_examined.values()) == {"pre-selection"}
    report = json.loads(json.dumps(result.to_dict()))
    assert report["examined"] == searched
    assert report["not_examined"] == {"pre-selection": sorted(result.not_examined)}
    assert len(report["preselection"]["scores"]["patch_scan"]) == CLASSES
    assert report["preselection"]["candidates"][0] == TARGET
    assert result.suspected[0] == TARGET


def test_external_scores_join_the_round_robin(many):
    model, source, preprocess, _ = many
    scores = np.zeros(CLASSES)
    scores[4] = 1.0
    result = synthesize(model, source, preprocess, SynthConfig(**dict(FAST, candidates=3)), provider="cpu",
                        class_scores={"probe": scores})
    pre = result.preselection
    # patch_scan's best, clean_logp's best, then the probe's best.
    assert pre.candidates[0] == TARGET and pre.candidates[2] == 4
    assert list(pre.scores) == ["patch_scan", "clean_logp", "probe"]
    with pytest.raises(UsageError, match="one per class"):
        synthesize(model, source, preprocess, SynthConfig(**FAST), provider="cpu", class_scores={"probe": [1.0]})
    with pytest.raises(UsageError, match="built-in"):
        synthesize(model, source, preprocess, SynthConfig(**FAST), provider="cpu",
                   class_scores={"clean_logp": scores})


def test_no_preselection_when_the_model_has_few_classes_or_classes_are_given(many):
    model, source, preprocess, _ = many
    given = synthesize(model, source, preprocess, SynthConfig(**dict(FAST, classes=(TARGET, 1, 2))), provider="cpu")
    assert given.preselection is None and [t.target for t in given.triggers] == [1, 2, TARGET]
    assert set(given.not_examined.values()) == {"not requested"} and len(given.not_examined) == CLASSES - 3
    wide = synthesize(model, source, preprocess, SynthConfig(**dict(FAST, candidates=10, references=10, steps=2,
                                                                     patch_steps=1)), provider="cpu")
    assert wide.preselection is None and len(wide.triggers) == CLASSES and not wide.not_examined


def test_query_budget_still_bounds_and_names_the_classes_it_cut(many, session_images):
    model, source, preprocess, _ = many
    seen = session_images
    budget = 6000
    result = synthesize(model, source, preprocess, SynthConfig(max_queries=budget, **FAST), provider="cpu")
    assert sum(seen) == result.queries <= budget
    # The candidates are searched first; the budget cut the references, and the report says so.
    pre = result.preselection
    assert [t.target for t in result.triggers] == sorted(pre.candidates)
    assert not result.complete
    assert result.to_dict()["not_examined"]["budget"] == sorted(pre.references)


def test_same_seed_same_selection_and_result(many):
    model, source, preprocess, _ = many
    config = SynthConfig(seed=1, **FAST)
    a = synthesize(model, source, preprocess, config, provider="cpu")
    b = synthesize(model, source, preprocess, config, provider="cpu")
    assert a.preselection.candidates == b.preselection.candidates
    assert a.preselection.references == b.preselection.references
    assert a.anomaly == b.anomaly and a.queries == b.queries
    picks = {preselect({}, CLASSES, 2, 2, seed).references for seed in range(6)}
    assert len(picks) > 1  # the reference draw follows the seed


def test_round_robin_and_reference_draw():
    s1 = np.array([0.0, 5.0, 4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    s2 = np.array([0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 8.0, 7.0, 0.0])
    pre = preselect({"a": s1, "b": s2}, 10, 4, 3, 0)
    assert pre.candidates == (1, 7, 2, 8)  # a's best, b's best not taken, a's next, b's next
    assert len(pre.references) == 3 and not set(pre.references) & set(pre.candidates)
    # Without sources the candidates are random too; never more classes than the model has.
    assert len(preselect({}, 10, 4, 3, 0).candidates) == 4
    assert len(set(preselect({"a": s1}, 5, 4, 3, 0).candidates + preselect({"a": s1}, 5, 4, 3, 0).references)) == 5


def test_weighted_baseline_stands_for_all_classes():
    pre = preselect({"a": np.arange(100.0)}, 100, 4, 4, 0)
    searched = sorted(pre.candidates + pre.references)
    w = baseline_weights(pre, searched)
    assert w.sum() == pytest.approx(100.0)
    assert all(w[searched.index(c)] == pytest.approx(96 / 4) for c in pre.references)
    # Four easy candidates (one a target) and four typical references: unweighted, the easy
    # candidates pull the median down and hide the target; weighted, the references set it.
    norms = {c: 40.0 for c in pre.references}
    norms.update(dict(zip(pre.candidates, [3.0, 12.0, 14.0, 15.0])))
    x = np.array([norms[c] for c in searched])
    target = searched.index(pre.candidates[0])
    assert anomaly_index(x)[target] < 3.5 < anomaly_index(x, weights=w)[target]
    np.testing.assert_allclose(anomaly_index(x, weights=np.ones(len(x))), anomaly_index(x))
    assert baseline_weights(None, searched) is None
    assert baseline_weights(replace(pre, references=()), searched) is None
    with pytest.raises(ValueError, match="weights"):
        anomaly_index(x, weights=np.ones(3))


def test_cli_says_what_the_preselection_left_out(many, tmp_path):
    model, _, _, calib = many
    app = typer.Typer()
    app.command()(synthesize_command)
    result = CliRunner().invoke(app, [str(model.path), "--calib", str(calib), "--steps", "2", "--json", "-",
                                      "--time-limit", "30"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_classes"] == CLASSES and len(report["examined"]) == 16
    assert sorted(report["not_examined"]["pre-selection"] + report["examined"]) == list(range(CLASSES))
    assert "pre-selection: searched 8 candidate and 8 reference classes of 20" in result.stderr


def test_scan_table_names_the_classes_left_out(many):
    model, _, _, calib = many
    result = CliRunner().invoke(app, ["scan", str(model.path), "--calib", str(calib), "--synthesize",
                                      "--time-limit", "3"])
    assert result.exit_code == 0, result.output
    assert "4 not examined (pre-selection)" in " ".join(result.output.split())


def test_verdict_feeds_the_probe_scores_into_the_preselection(many):
    model, _, _, calib = many
    result = CliRunner().invoke(app, ["scan", str(model.path), "--calib", str(calib), "--verdict",
                                      "--time-limit", "3", "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    pre = json.loads(result.stdout)["extra"]["synthesis"]["preselection"]
    assert len(pre["scores"]["probes"]) == CLASSES and "patch_scan" in pre["scores"]
