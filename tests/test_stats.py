"""Streaming aggregates: merging per-batch aggregates equals one pass over all images."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnx_linf.measure.instrument import TapOutput
from onnx_linf.measure.stats import ChannelStats, Moments, StatsCollector, TopK

values = arrays(np.float64, st.tuples(st.integers(1, 40), st.integers(1, 6)),
                elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False))


@settings(max_examples=60, deadline=None)
@given(values, st.lists(st.integers(1, 39), max_size=5))
def test_batchwise_merge_equals_one_pass(data, cuts):
    cuts = sorted({c for c in cuts if c < len(data)})
    merged = Moments.empty(data.shape[1])
    for part in np.split(data, cuts):
        merged = merged.merge(Moments.of(part))
    one = Moments.of(data)
    assert merged.count == one.count == len(data)
    np.testing.assert_allclose(merged.mean, data.mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(merged.std, data.std(axis=0), rtol=1e-7, atol=1e-7)
    np.testing.assert_array_equal(merged.max, data.max(axis=0))
    np.testing.assert_array_equal(merged.min, data.min(axis=0))


@settings(max_examples=40, deadline=None)
@given(values)
def test_max_at_least_mean_at_least_min(data):
    m = Moments.of(data)
    assert np.all(m.max >= m.mean - 1e-9) and np.all(m.mean >= m.min - 1e-9)


def test_merge_is_order_independent():
    rng = np.random.default_rng(0)
    a, b, c = (Moments.of(rng.normal(size=(n, 4))) for n in (3, 7, 11))
    left, right = a.merge(b).merge(c), c.merge(a.merge(b))
    np.testing.assert_allclose(left.mean, right.mean)
    np.testing.assert_allclose(left.m2, right.m2)


def test_collector_folds_batches_and_extremes():
    outputs = {"o/linf": TapOutput("t", "linf"), "o/pmax": TapOutput("t", "pos_max"),
               "o/pmin": TapOutput("t", "pos_min")}
    collector = StatsCollector(outputs, {"t": 2})
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(4, 2, 3, 3)) for _ in range(3)]
    for a in batches:
        collector.update({"o/linf": np.abs(a).max(axis=(2, 3)), "o/pmax": a.max(axis=0),
                          "o/pmin": a.min(axis=0)})
    everything = np.concatenate(batches)
    st_ = collector.result()["t"]
    assert st_.count == 12
    np.testing.assert_allclose(st_.moments["linf"].mean, np.abs(everything).max(axis=(2, 3)).mean(axis=0))
    np.testing.assert_array_equal(st_.pos_max, everything.max(axis=0))
    np.testing.assert_array_equal(st_.pos_min, everything.min(axis=0))


def test_channel_stats_merge_of_shards():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(6, 3))
    pa, pb = rng.normal(size=(3, 2, 2)), rng.normal(size=(3, 2, 2))
    s1 = ChannelStats("t", 3, {"linf": Moments.of(a)}, pos_max=pa)
    s2 = ChannelStats("t", 3, {"linf": Moments.of(b)}, pos_max=pb)
    merged = s1.merge(s2)
    np.testing.assert_allclose(merged.moments["linf"].mean, np.concatenate([a, b]).mean(axis=0))
    np.testing.assert_array_equal(merged.pos_max, np.maximum(pa, pb))


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 30), st.integers(1, 4)),
              elements=st.floats(-100, 100, allow_nan=False)),
       st.integers(1, 6), st.lists(st.integers(1, 29), max_size=4), st.booleans())
def test_streaming_topk_is_exact_order_statistic(data, k, cuts, largest):
    cuts = sorted({c for c in cuts if c < len(data)})
    acc = TopK(k, largest)
    for part in np.split(data, cuts):
        acc.update(part)
    ordered = np.sort(data, axis=0)
    kk = min(k, len(data))
    expected = ordered[-kk] if largest else ordered[kk - 1]
    np.testing.assert_array_equal(acc.kth(), expected)
    assert acc.count == len(data)
