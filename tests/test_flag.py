"""Flagging policies: which channels, and the scores behind them."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_linf.decide.flag import by_outliers, by_ratio, differential_scores, robust_z, top_k
from onnx_linf.errors import UsageError
from onnx_linf.measure.stats import ChannelStats, Moments


def test_ratio_flags_top_fraction_per_tap():
    scores = {"a": np.array([0.1, 5.0, 0.3, 4.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0]), "b": np.arange(20.0)}
    flagged = by_ratio(scores, 0.1, score="differential linf", evidence=True)
    assert flagged.taps["a"].flagged == (1,)
    assert flagged.taps["b"].flagged == (19, 18)
    assert flagged.total == 3 and flagged.channels() == {"a": [1], "b": [18, 19]}


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval_is_rejected(ratio):
    with pytest.raises(UsageError, match=r"--ratio must be in \(0, 1\)"):
        by_ratio({"a": np.ones(3)}, ratio, score="x", evidence=False)


def test_top_k_rounds_and_keeps_one():
    assert [top_k(0.1, c) for c in (3, 10, 16, 64)] == [1, 1, 2, 6]


def test_outliers_use_median_and_mad():
    s = np.array([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 9.0])
    z = robust_z(s)
    assert z[-1] > 3.5 and np.all(np.abs(z[:-1]) < 3.5)
    assert by_outliers({"t": s}, 3.5, score="x", evidence=True).taps["t"].flagged == (6,)


def test_constant_scores_flag_nothing():
    assert by_outliers({"t": np.ones(8)}, 3.5, score="x", evidence=False).total == 0


def test_differential_is_evidence_minus_clean():
    clean = {"t": ChannelStats("t", 2, {"linf": Moments.of(np.array([[1.0, 2.0], [3.0, 2.0]]))})}
    trig = {"t": ChannelStats("t", 2, {"linf": Moments.of(np.array([[5.0, 2.0], [7.0, 2.0]]))})}
    np.testing.assert_allclose(differential_scores(clean, trig)["t"], [4.0, 0.0])
