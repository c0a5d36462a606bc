"""The fast paths of a scan: pooled reductions, their execution order, I/O binding, the run loop,
session memory and `auto_batch_size`.

The pooled reductions are checked against numpy on the raw map fetched from the *same* session, so
only the reductions are compared (two separately optimised sessions may differ in the maps
themselves by float rounding).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_linf.measure.calibrate import BatchChoice, auto_batch_size, prefetch, run_batches
from onnx_linf.measure.instrument import instrument
from onnx_linf.measure.preprocess import Preprocess
from onnx_linf.measure.session import PROVIDERS, Session, create_session
from onnx_linf.measure.sources import FeedSource
from onnx_linf.model.load import load_model
from onnx_linf.model.taps import Tap, find_taps

import models

POOLED = ("linf", "l1", "l2", "img_max", "chan_max")


def awkward_sizes(opset: int = 17) -> onnx.ModelProto:
    """input[N,3,45,50] -> conv1(16) -> Relu -> [conv2(s2) -> bn2] + [conv_s(s2) -> bn_s] -> Add -> Relu -> head

    Maps of 45x50 and 23x25 are not multiples of the pre-summing block, so its zero padding is used;
    bn2 and bn_s are signed maps (they feed the residual Add), the others non-negative.
    """
    g = models.GraphBuilder(7)
    x = g.node("Relu", [g.conv("input", 3, 16, "conv1")], "relu1")
    y = g.bn(g.conv(x, 16, 16, "conv2", stride=2), 16, "bn2")
    s = g.bn(g.conv(x, 16, 16, "conv_s", k=1, stride=2), 16, "bn_s")
    z = g.node("Relu", [g.node("Add", [y, s], "add")], "relu2")
    f = g.node("Flatten", [g.node("GlobalAveragePool", [z], "gap")], "flatten", axis=1)
    return g.model(["N", 3, 45, 50], g.gemm(f, 16, 4, "fc"), ["N", 4], opset=opset)


def conv_chain(depth: int = 6, channels: int = 32, size: int = 24) -> onnx.ModelProto:
    """input -> depth x (conv -> Relu) -> GAP -> Flatten -> Gemm, with channels ORT runs blocked (NCHWc)."""
    g = models.GraphBuilder(3)
    x, cin = "input", 3
    for i in range(depth):
        x = g.node("Relu", [g.conv(x, cin, channels, f"conv{i}")], f"relu{i}")
        cin = channels
    f = g.node("Flatten", [g.node("GlobalAveragePool", [x], "gap")], "flatten", axis=1)
    return g.model(["N", 3, size, size], g.gemm(f, channels, 3, "fc"), ["N", 3])


def numpy_stat(a: np.ndarray, stat: str) -> np.ndarray:
    a = a.astype(np.float64)
    return {"linf": np.abs(a).max(axis=(2, 3)), "l1": np.abs(a).sum(axis=(2, 3)),
            "l2": np.sqrt((a * a).sum(axis=(2, 3))), "img_max": a.max(axis=(2, 3)),
            "chan_max": a.max(axis=(0, 2, 3))}[stat]


def check_against_raw(model, x: np.ndarray, method: str = "pool", stats: tuple[str, ...] = POOLED) -> dict[str, int]:
    taps = find_taps(model, "all+branches")
    inst = instrument(model, taps, stats=stats + ("raw",), method=method)
    values = dict(zip(inst.output_names(), create_session(model, inst.proto, "cpu").run(inst.output_names(), x)))
    raw = {ref.tap: values[name] for name, ref in inst.outputs.items() if ref.stat == "raw"}
    kinds = {"signed": 0, "non_negative": 0}
    for name, ref in inst.outputs.items():
        if ref.stat == "raw":
            continue
        got = values[name]
        expected = numpy_stat(raw[ref.tap], ref.stat)
        assert got.dtype == np.float32 and got.shape == expected.shape, (ref, got.shape, expected.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"{ref.tap} {ref.stat} ({method})")
    for tap in taps:
        kinds["non_negative" if tap.non_negative else "signed"] += 1
    return kinds


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("stats", [POOLED, ("linf", "l1"), ("linf",), ("l1",), ("l2", "img_max")])
def test_pooled_stats_equal_numpy_with_padded_blocks(opset, stats, model_file):
    """Every combination takes a different path for signed maps (x*x, Relu(x) or max(-x, 0))."""
    model = load_model(model_file(awkward_sizes(opset)))
    x = np.random.default_rng(0).normal(0, 1, (3, 3, 45, 50)).astype(np.float32)
    kinds = check_against_raw(model, x, stats=stats)
    assert kinds["signed"] >= 2 and kinds["non_negative"] >= 2


def test_pooled_and_reduce_methods_agree(model_file):
    model = load_model(model_file(awkward_sizes()))
    x = np.random.default_rng(1).normal(0, 1, (2, 3, 45, 50)).astype(np.float32)
    taps = find_taps(model, "all+branches")
    results = {}
    for method in ("pool", "reduce"):
        inst = instrument(model, taps, stats=("linf", "l1", "l2"), method=method)
        out = create_session(model, inst.proto, "cpu").run(inst.output_names(), x)
        results[method] = {(ref.tap, ref.stat): v for (name, ref), v in zip(inst.outputs.items(), out)}
    assert results["pool"].keys() == results["reduce"].keys()
    for key, value in results["pool"].items():
        np.testing.assert_allclose(value, results["reduce"][key], rtol=2e-5, atol=1e-6, err_msg=str(key))


def test_pooled_stats_on_dynamic_spatial_size(model_file):
    """H, W unknown statically: the spatial size is computed in-graph from the map's shape."""
    model = load_model(model_file(models.dynamic_spatial()))
    assert not any(t.static_spatial for t in find_taps(model))
    for shape in ((2, 3, 20, 30), (1, 3, 7, 5)):
        check_against_raw(model, np.random.default_rng(2).normal(0, 1, shape).astype(np.float32))


def test_pooled_stats_on_large_maps_stay_within_1e5(tmp_path):
    """A 112x112 map of many similar small values: ORT's sequential float32 sums drift past 1e-5
    there (ReduceL1 included); the block pre-summing keeps ℓ1 and ℓ2 within it."""
    g = models.GraphBuilder(0)
    g.nodes.append(onnx.helper.make_node("Relu", ["input"], ["relu"], name="relu"))
    model = load_model(models.save(g.model(["N", 16, 112, 112], "relu", ["N", 16, 112, 112]), tmp_path / "m.onnx"))
    tap = Tap("relu", 16, (112, 112), "named", "relu", ("relu",), True)
    inst = instrument(model, [tap], stats=("l1", "l2"))
    x = np.random.default_rng(3).uniform(0.0, 0.4, (2, 16, 112, 112)).astype(np.float32)
    got = create_session(model, inst.proto, "cpu").run(inst.output_names(), x)
    a = x.astype(np.float64)
    np.testing.assert_allclose(got[0], a.sum(axis=(2, 3)), rtol=1e-5)
    np.testing.assert_allclose(got[1], np.sqrt((a * a).sum(axis=(2, 3))), rtol=1e-5)


def executed_nodes(model, proto, x) -> list[str]:
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, {model.input.name: x})
    path = Path(session.end_profiling())
    events = json.loads(path.read_text())
    path.unlink()  # ORT writes the profile into the working directory
    return [e["name"][: -len("_kernel_time")] for e in events
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def test_reductions_execute_next_to_their_producer(model_file):
    """In ORT's actual execution order, each map's reductions run before the next map's, and all
    before the model's head: no tapped map has to stay alive until the last conv."""
    model = load_model(model_file(conv_chain()))
    taps = find_taps(model, "all")
    inst = instrument(model, taps, stats=("linf", "l1", "l2"))
    order = executed_nodes(model, inst.proto, np.ones((2, 3, 24, 24), np.float32))
    leaf_of = {n.output[0]: n.name for n in inst.proto.graph.node if n.output[0] in inst.outputs}
    tap_index = {t.name: i for i, t in enumerate(taps)}
    seen = [tap_index[inst.outputs[out].tap] for name in order for out, leaf in leaf_of.items() if leaf == name]
    assert len(seen) == len(inst.outputs)
    assert seen == sorted(seen), "reductions ran out of tap order"
    first_reduction = min(order.index(leaf) for leaf in leaf_of.values())
    assert first_reduction < order.index("fc"), "reductions ran after the head"
    # ...and interleaved with the backbone: the first map's statistics are done before the last conv.
    first_tap_done = max(order.index(leaf) for out, leaf in leaf_of.items() if tap_index[inst.outputs[out].tap] == 0)
    assert first_tap_done < len(order) - len(inst.outputs)


def test_io_binding_gives_identical_results_on_cpu(model_file):
    """The binding path (chosen automatically for CUDA) computes the same bytes as a plain run."""
    model = load_model(model_file(awkward_sizes()))
    inst = instrument(model, find_taps(model), stats=("linf", "l1", "l2", "pos_max"))
    plain = create_session(model, inst.proto, "cpu")
    bound = create_session(model, inst.proto, "cpu")
    bound.io_binding = True
    assert bound.uses_binding and not plain.uses_binding
    x = np.random.default_rng(4).normal(0, 1, (4, 3, 45, 50)).astype(np.float32)
    names = inst.output_names()
    for a, b in zip(plain.run(names, x), bound.run(names, bound.stage(x))):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # All outputs (None) and the model's own output too.
    for a, b in zip(plain.run(None, x), bound.run(None, x)):
        assert np.array_equal(a, b)


def test_io_binding_with_fixed_batch_padding(model_file):
    model = load_model(model_file(models.plain_cnn(batch=5)))
    inst = instrument(model, find_taps(model), stats=("linf", "pos_max"))
    batch_level = [n for n, r in inst.outputs.items() if r.stat == "pos_max"]
    plain = create_session(model, inst.proto, "cpu")
    bound = Session(plain.inner, plain.provider, plain.input_name, plain.fixed_batch, io_binding=True)
    x = np.random.default_rng(5).normal(0, 1, (3, 3, 8, 8)).astype(np.float32)
    for a, b in zip(plain.run(inst.output_names(), x, batch_level), bound.run(inst.output_names(), x, batch_level)):
        assert np.array_equal(a, b)


def test_cuda_path_is_chosen_by_provider():
    """No GPU needed: the choice follows `provider`, and staging only uploads for CUDA."""
    fake = Session(inner=None, provider=PROVIDERS["cuda"], input_name="x", fixed_batch=None)  # type: ignore[arg-type]
    assert fake.uses_binding
    assert not Session(None, PROVIDERS["cpu"], "x", None).uses_binding  # type: ignore[arg-type]
    cpu_bound = Session(None, PROVIDERS["cpu"], "x", None, io_binding=True)  # type: ignore[arg-type]
    x = np.zeros((2, 3), np.float32)
    assert cpu_bound.stage(x) is x
    padded = Session(None, PROVIDERS["cuda"], "x", 4)  # type: ignore[arg-type]
    assert padded.stage(x) is x  # a short batch is padded on the host by `run`, so it stays there


def test_run_batches_matches_direct_runs(model_file):
    model = load_model(model_file(awkward_sizes()))
    inst = instrument(model, find_taps(model))
    session = create_session(model, inst.proto, "cpu")
    x = np.random.default_rng(6).normal(0, 1, (7, 3, 45, 50)).astype(np.float32)
    names = inst.output_names()
    pre = Preprocess(size=(45, 50))
    got = list(run_batches(session, FeedSource([x]), pre, names, batch_size=3))
    assert [len(v[names[0]]) for v in got] == [3, 3, 1]
    for i, values in enumerate(got):
        direct = session.run(names, x[3 * i:3 * i + 3])
        for name, d in zip(names, direct):
            assert np.array_equal(values[name], d)


def test_prefetch_stops_its_worker_when_the_consumer_stops():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    before = threading.active_count()
    for item in prefetch(endless(), depth=2):
        if item == 3:
            break
    assert closed.wait(2.0), "the source generator was not closed"
    deadline = time.monotonic() + 2.0
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before


def test_prefetch_reraises_source_errors():
    def failing():
        yield 1
        raise ValueError("broken image")

    with pytest.raises(ValueError, match="broken image"):
        list(prefetch(failing()))


def test_session_does_not_keep_the_serialized_model(model_file):
    """ORT's wrapper would keep the model bytes (a second copy of the weights) for the session's life."""
    model = load_model(model_file(models.resnet_block()))
    session = create_session(model, None, "cpu")
    assert getattr(session.inner, "_model_bytes", None) is None
    assert session.inner.get_session_options().enable_mem_pattern is False


def test_cpu_sessions_share_one_arena(model_file):
    """Every CPU session draws from the one CPU arena registered with ORT's environment, so the
    fold sessions of a clamp do not each keep a batch's activations (ResNet-18: 4.1 GB -> 2.5 GB)."""
    model = load_model(model_file(models.resnet_block()))
    sessions = [create_session(model, None, "cpu") for _ in range(2)]
    for s in sessions:
        assert s.inner.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
    shape = [d if isinstance(d, int) else 3 for d in model.input.shape]
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    a, b = (s.run(None, x)[0] for s in sessions)
    np.testing.assert_array_equal(a, b)


def test_external_data_model_keeps_weights_out_of_python(tmp_path):
    """A model with external data is instrumented without its weights and runs like the inline one."""
    proto = conv_chain(depth=3)
    inline = load_model(models.save(proto, tmp_path / "inline.onnx"))
    weights = {i.name for i in proto.graph.initializer}
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    onnx.save(proto, str(ext_dir / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    external = load_model(ext_dir / "m.onnx")
    assert external.has_external_data
    x = np.random.default_rng(7).normal(0, 1, (2, 3, 24, 24)).astype(np.float32)
    results = []
    for model in (inline, external):
        inst = instrument(model, find_taps(model))
        results.append(create_session(model, inst.proto, "cpu").run(inst.output_names(), x))
        held = sum(len(i.raw_data) + 4 * len(i.float_data) for i in inst.proto.graph.initializer if i.name in weights)
        assert (held == 0) == (model is external)
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_auto_batch_size_fixed_batch_model(model_file):
    model = load_model(model_file(models.plain_cnn(batch=5)))
    choice = auto_batch_size(model, "cpu")
    assert isinstance(choice, BatchChoice) and choice.batch_size == 5 and "fixes" in choice.reason


def test_auto_batch_size_respects_memory_images_and_throughput(model_file):
    model = load_model(model_file(conv_chain(size=64)))
    taps = find_taps(model)
    roomy = auto_batch_size(model, "cpu", taps=taps, memory_bytes=2**40)
    assert roomy.batch_size == 16 and roomy.provider == PROVIDERS["cpu"] and "throughput" in roomy.reason
    assert roomy.per_image_bytes > 6 * 32 * 64 * 64 * 4 // 3  # at least a few maps' worth
    tight = auto_batch_size(model, "cpu", taps=taps, memory_bytes=3 * roomy.per_image_bytes)
    assert tight.batch_size == 2 and "memory" in tight.reason
    few = auto_batch_size(model, "cpu", taps=taps, images=5, memory_bytes=2**40)
    assert few.batch_size == 5
    gpu = auto_batch_size(model, "CUDAExecutionProvider", taps=taps, memory_bytes=2**40)
    assert gpu.batch_size == 128 and gpu.provider == PROVIDERS["cuda"]


def test_auto_batch_size_estimate_grows_with_the_input(model_file):
    model = load_model(model_file(models.dynamic_spatial()))
    small = auto_batch_size(model, "cpu", size=(16, 16), memory_bytes=2**30)
    large = auto_batch_size(model, "cpu", size=(64, 64), memory_bytes=2**30)
    assert large.per_image_bytes > 10 * small.per_image_bytes
    unknown = auto_batch_size(model, "cpu", memory_bytes=2**30)
    assert unknown.per_image_bytes is None and unknown.batch_size == 8 and "unknown" in unknown.reason


def test_auto_batch_size_rejects_unknown_provider(model_file):
    from onnx_linf.errors import UsageError

    model = load_model(model_file(models.plain_cnn()))
    with pytest.raises(UsageError):
        auto_batch_size(model, "npu")
