"""Comparison policies: Fine-Pruning's dormant channels and data-free Channel Lipschitzness (CLP)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

from onnx_linf.decide.flag import by_ratio, by_threshold, clp_scores, dormant_scores
from onnx_linf.errors import UsageError
from onnx_linf.measure.stats import ChannelStats, Moments
from onnx_linf.model.load import load_model
from onnx_linf.model.taps import find_taps

import models


def _stats(tap: str, l1: list[float], linf: list[float]) -> ChannelStats:
    return ChannelStats(tap, len(l1), {"l1": Moments.of(np.array([l1, l1])),
                                       "linf": Moments.of(np.array([linf, linf]))})


def test_dormant_scores_rank_least_active_first():
    stats = {"t": _stats("t", [0.5, 0.0, 2.0, 0.1], [1.0, 3.0, 0.2, 0.4])}
    scores = dormant_scores(stats)
    np.testing.assert_allclose(scores["t"], [-0.5, 0.0, -2.0, -0.1])
    # Fine-Pruning prunes the least active channels: the top of the ratio policy on these scores.
    assert by_ratio(scores, 0.5, score="dormant l1", evidence=False).channels() == {"t": [1, 3]}
    np.testing.assert_allclose(dormant_scores(stats, "linf")["t"], [-1.0, -3.0, -0.2, -0.4])


def test_dormant_scores_reject_unknown_statistic():
    with pytest.raises(UsageError):
        dormant_scores({"t": _stats("t", [1.0], [1.0])}, "l3")


def _reference_clp(weight: np.ndarray, bn: tuple[np.ndarray, np.ndarray, float] | None) -> np.ndarray:
    """CLP by the paper's definition, one output channel at a time."""
    out = []
    for k in range(weight.shape[0]):
        wk = weight[k].reshape(weight.shape[1], -1).astype(np.float64)
        s = np.linalg.norm(wk, ord=2)  # largest singular value
        if bn is not None:
            gamma, var, eps = bn
            s *= abs(float(gamma[k]) / np.sqrt(float(var[k]) + eps))
        out.append(s)
    return np.array(out)


def test_clp_scores_match_numpy_reference(model_file):
    proto = models.plain_cnn()
    model = load_model(model_file(proto))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    taps = find_taps(model, "all")
    scores = clp_scores(model, taps)
    by_source = {t.source: t.name for t in taps}
    # conv1 is followed by bn1 (folded in; ONNX stores its epsilon as float32), conv2 by a Relu only.
    np.testing.assert_allclose(
        scores[by_source["conv1"]],
        _reference_clp(inits["conv1.w"], (inits["bn1.scale"], inits["bn1.var"], float(np.float32(1e-5)))), rtol=1e-9)
    np.testing.assert_allclose(scores[by_source["conv2"]], _reference_clp(inits["conv2.w"], None), rtol=1e-9)


def test_clp_scores_handle_grouped_convs_and_skip_maps_without_a_kernel(model_file):
    proto = models.depthwise()
    model = load_model(model_file(proto))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    taps = find_taps(model, "all")
    scores = clp_scores(model, taps)
    dw = next(t.name for t in taps if t.source == "dw")
    # A depthwise kernel is [1, k*k] per channel: its spectral norm is the vector's 2-norm.
    np.testing.assert_allclose(scores[dw], np.linalg.norm(inits["dw.w"].reshape(8, -1), axis=1), rtol=1e-6)

    computed = load_model(model_file(models.computed_weights(), "computed.onnx"))
    assert clp_scores(computed, find_taps(computed, "all")) == {}  # weights made by a node: no score


def test_by_threshold_flags_mean_plus_u_std():
    s = np.array([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.0, 1.0, 5.0])
    flagged = by_threshold({"t": s}, 2.0)
    assert flagged.policy == "threshold" and not flagged.evidence
    assert flagged.channels() == {"t": [9]}
    assert by_threshold({"t": s}, 3.0).channels() == {}  # 5.0 < mean + 3 std for this vector
    # u = 0 flags everything above the mean, most extreme first.
    assert by_threshold({"t": np.array([3.0, 1.0, 2.0, 0.0])}, 0.0).taps["t"].flagged == (0, 2)
    with pytest.raises(UsageError):
        by_threshold({"t": s}, -1.0)


def test_clp_on_the_digits_backdoor_is_data_free(fixtures_dir: Path):
    model = load_model(fixtures_dir / "digits_badnets.onnx")
    taps = find_taps(model, "all")
    scores = clp_scores(model, taps)
    assert set(scores) == {t.name for t in taps if t.kind == "conv"}
    for tap in taps:
        assert scores[tap.name].shape == (tap.channels,)
        assert np.all(scores[tap.name] >= 0)
    flagged = by_threshold(scores, 3.0)
    assert flagged.score == "clp"
