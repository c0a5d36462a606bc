"""Differential tests: in-graph reductions equal numpy on the raw activation tensor.

This is the core invariant of onnx-linf: ONNX Runtime (with its graph optimisations ON) computes the
same ℓ∞/ℓ1/ℓ2 per channel as numpy does on the activation fetched whole.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnx_linf.measure.instrument import instrument
from onnx_linf.measure.session import create_session
from onnx_linf.model.load import load_model
from onnx_linf.model.taps import find_taps

import models

CASES = {
    "plain_cnn_opset13": (lambda: models.plain_cnn(opset=13), (3, 8, 8)),
    "plain_cnn_opset18": (lambda: models.plain_cnn(opset=18), (3, 8, 8)),
    "plain_cnn_fixed_batch": (lambda: models.plain_cnn(batch=5), (3, 8, 8)),
    "resnet_block": (models.resnet_block, (3, 8, 8)),
    "resnet_block_opset18": (lambda: models.resnet_block(opset=18), (3, 8, 8)),
    "depthwise": (models.depthwise, (3, 8, 8)),
    "nhwc_input": (models.nhwc_input, (8, 8, 3)),
    "computed_weights": (models.computed_weights, (3, 6, 6)),
    "silu_cnn": (models.silu_cnn, (3, 8, 8)),
}


def numpy_stats(a: np.ndarray) -> dict[str, np.ndarray]:
    a = a.astype(np.float64)
    return {"linf": np.abs(a).max(axis=(2, 3)), "l1": np.abs(a).sum(axis=(2, 3)),
            "l2": np.sqrt((a**2).sum(axis=(2, 3))),
            "pos_max": a.max(axis=0), "pos_min": a.min(axis=0),
            "chan_max": a.max(axis=(0, 2, 3)), "chan_min": a.min(axis=(0, 2, 3))}


def run_differential(model, input_shape, n=5, seed=0):
    taps = find_taps(model, "all")
    stats = ("linf", "l1", "l2", "pos_max", "pos_min", "chan_max", "chan_min")
    inst = instrument(model, taps, stats=stats)
    # Raw tensors come from a *separate* model, so the instrumented graph is exactly what users run.
    raw = instrument(model, taps, stats=("raw",))
    x = np.random.default_rng(seed).normal(0, 1, (n, *input_shape)).astype(np.float32)
    got = dict(zip(inst.output_names(), create_session(model, inst.proto, "cpu").run(inst.output_names(), x)))
    raw_vals = dict(zip(raw.output_names(), create_session(model, raw.proto, "cpu").run(raw.output_names(), x)))
    raw_by_tap = {raw.outputs[k].tap: v for k, v in raw_vals.items()}
    checked = 0
    for name, ref in inst.outputs.items():
        expected = numpy_stats(raw_by_tap[ref.tap])[ref.stat]
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{ref.tap} {ref.stat}")
        checked += 1
    return taps, checked


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_graph_stats_equal_numpy(case, model_file):
    build, shape = CASES[case]
    model = load_model(model_file(build()))
    taps, checked = run_differential(model, shape, n=5)
    assert checked == 7 * len(taps)
    assert taps


@pytest.mark.parametrize("name", ["digits_clean", "digits_badnets", "digits_blended"])
def test_fixture_stats_equal_numpy(name, fixtures_dir):
    model = load_model(fixtures_dir / f"{name}.onnx")
    taps, checked = run_differential(model, (1, 16, 16), n=8)
    assert [t.name for t in taps if t.is_last], "fixture must have a last map"


def test_instrumented_model_keeps_original_outputs(model_file):
    model = load_model(model_file(models.resnet_block()))
    inst = instrument(model, find_taps(model), stats=("linf",))
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)
    plain = create_session(model, None, "cpu").run(None, x)[0]
    with_taps = create_session(model, inst.proto, "cpu").run(["fc_out"], x)[0]
    np.testing.assert_allclose(with_taps, plain, rtol=1e-6, atol=1e-6)
    assert inst.original_outputs == ("fc_out",)
    # The input model is not modified.
    assert len(model.proto.graph.output) == 1


def test_opset18_uses_axes_input(model_file):
    """Opset 18 moved Reduce* axes from an attribute to an input; an attribute would fail to load."""
    model = load_model(model_file(models.plain_cnn(opset=18)))
    inst = instrument(model, find_taps(model), stats=("linf", "l1", "l2", "pos_max", "img_min"))
    reduce_nodes = [n for n in inst.proto.graph.node if n.op_type.startswith("Reduce")]
    assert reduce_nodes
    assert all(len(n.input) == 2 and all(a.name != "axes" for a in n.attribute) for n in reduce_nodes)


@pytest.mark.parametrize("case", ["resnet_block", "nhwc_input", "plain_cnn_opset13", "plain_cnn_opset18"])
@pytest.mark.parametrize("n", [2, 5])
def test_topk_and_image_extremes_equal_numpy(case, n, model_file):
    """TopK over the batch axis (k=3, also when the batch is smaller than k) and signed per-image extremes."""
    build, shape = CASES[case]
    model = load_model(model_file(build()))
    taps = find_taps(model, "all")
    inst = instrument(model, taps, stats=("pos_top", "pos_bottom", "img_max", "img_min"), topk=3)
    raw = instrument(model, taps, stats=("raw",))
    x = np.random.default_rng(3).normal(0, 1, (n, *shape)).astype(np.float32)
    got = dict(zip(inst.output_names(), create_session(model, inst.proto, "cpu").run(inst.output_names(), x)))
    raws = dict(zip(raw.output_names(), create_session(model, raw.proto, "cpu").run(raw.output_names(), x)))
    by_tap = {raw.outputs[k].tap: v for k, v in raws.items()}
    k = min(3, n)
    for name, ref in inst.outputs.items():
        a = by_tap[ref.tap]
        expected = {"pos_top": np.sort(a, axis=0)[-k:], "pos_bottom": np.sort(a, axis=0)[:k],
                    "img_max": a.max(axis=(2, 3)), "img_min": a.min(axis=(2, 3))}[ref.stat]
        value = np.sort(got[name], axis=0) if ref.stat.startswith("pos_") else got[name]
        np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=f"{ref.tap} {ref.stat}")
