"""Throughput and memory of a scan against plain inference of the same model on the same batches.

Not a test: the project's instrument for every performance claim in ``benchmarks/README.md``.
Models are built here with onnx.helper (random He-initialised weights, written to a temporary
folder, never committed): ResNet-18, ResNet-50, a MobileNetV2-style depthwise model and a small
CIFAR-size CNN.

For each model, in ONE process, variants are interleaved round by round (the order rotates every
round) and each round processes the same batches; tables give medians with min-max, and the
ratio to plain inference is taken per round (adjacent runs share the machine's load):

* plain inference: an ORT session straight from the file (what a user would run);
* ``scan --layers last`` and ``--layers all`` with the default statistics (`pipeline.Probe`);
* with ``--detail``: all maps with fewer statistics, the non-negative (ReLU) maps only, and the
  naive in-graph ReduceMax/ReduceL1/ReduceL2 form (``instrument(method="reduce")``);
* whole activations as graph outputs + numpy reductions (the approach onnx-linf replaces);
* the models ``clamp`` writes (position bounds; both bounds) and the blocked CPU artefact of the
  latter (`rewrite.blocked.blocked_artifact`), run as plain inference, and their batch-1 latency
  (p50/p99 over ``--latency-runs`` requests, original vs sanitized vs artefact);
* end to end from a folder of JPEG files: ``pipeline.scan`` vs the same loader feeding the plain
  model, and vs a sequential decode-then-infer loop (decode and preprocess included everywhere).

Peak RSS is measured per variant in separate processes (each child's own VmHWM, see `peak_rss_mb`),
including the real ``onnx-linf scan`` CLI on N and 10N JPEG files.

Usage::

    python benchmarks/perf.py                         # all models, 5 rounds (~10 min on 2 cores)
    python benchmarks/perf.py --models resnet50 --rounds 9 --detail
    python benchmarks/perf.py --no-memory --no-e2e --models cifar_cnn
    python benchmarks/perf.py --out benchmarks/out/perf.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_linf.measure.instrument import CHANNEL_STATS as ALL_NORMS  # the naive baselines compute all three
from onnx_linf.measure.instrument import DEFAULT_STATS

OPSET = 17


class _Net:
    """Builds a random-weight CNN with onnx.helper (He-initialised so activations stay finite)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, value: np.ndarray, base: str = "w") -> str:
        name = self._name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def op(self, op: str, inputs: list[str], base: str | None = None, **attrs) -> str:
        name = self._name(base or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1) -> str:
        fan_in = cin // group * k * k
        w = self.const(self.rng.normal(0.0, np.sqrt(2.0 / fan_in), (cout, cin // group, k, k)))
        return self.op("Conv", [x, w], "conv", kernel_shape=[k, k], strides=[stride, stride],
                       pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int, gamma: float = 1.0) -> str:
        return self.op("BatchNormalization", [
            x, self.const(np.full(c, gamma) * self.rng.uniform(0.8, 1.2, c)),
            self.const(self.rng.normal(0.0, 0.1, c)), self.const(self.rng.normal(0.0, 0.1, c)),
            self.const(self.rng.uniform(0.8, 1.2, c))], "bn", epsilon=1e-5)

    def relu(self, x: str) -> str:
        return self.op("Relu", [x], "relu")

    def relu6(self, x: str) -> str:
        return self.op("Clip", [x, self.const(np.array(0.0), "lo"), self.const(np.array(6.0), "hi")], "relu6")

    def head(self, x: str, c: int, classes: int) -> str:
        x = self.op("GlobalAveragePool", [x], "gap")
        x = self.op("Flatten", [x], "flatten", axis=1)
        w = self.const(self.rng.normal(0.0, np.sqrt(1.0 / c), (classes, c)))
        return self.op("Gemm", [x, w, self.const(np.zeros(classes))], "fc", transB=1)

    def model(self, out: str, size: int, classes: int, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", classes])], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
        onnx.checker.check_model(model)
        return model


def resnet(depths: tuple[int, ...], bottleneck: bool, seed: int = 0, size: int = 224,
           classes: int = 1000) -> onnx.ModelProto:
    """torchvision-shaped ResNet (v1.5: stride on the 3x3), Conv->BN->Relu, residual Add->Relu."""
    g = _Net(seed)
    x = g.op("MaxPool", [g.relu(g.bn(g.conv("input", 3, 64, 7, 2), 64))], "pool",
             kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin, expansion = 64, 4 if bottleneck else 1
    for stage, blocks in enumerate(depths):
        width = 64 * 2**stage
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            cout = width * expansion
            if bottleneck:
                y = g.relu(g.bn(g.conv(x, cin, width, 1), width))
                y = g.relu(g.bn(g.conv(y, width, width, 3, stride), width))
                y = g.bn(g.conv(y, width, cout, 1), cout, gamma=0.3)
            else:
                y = g.relu(g.bn(g.conv(x, cin, width, 3, stride), width))
                y = g.bn(g.conv(y, width, cout, 3), cout, gamma=0.3)
            short = x if stride == 1 and cin == cout else g.bn(g.conv(x, cin, cout, 1, stride), cout)
            x = g.relu(g.op("Add", [y, short], "add"))
            cin = cout
    return g.model(g.head(x, cin, classes), size, classes, "resnet")


def resnet18(seed: int = 0) -> onnx.ModelProto:
    return resnet((2, 2, 2, 2), bottleneck=False, seed=seed)


def resnet50(seed: int = 0) -> onnx.ModelProto:
    return resnet((3, 4, 6, 3), bottleneck=True, seed=seed)


def mobilenet_v2(seed: int = 0, size: int = 224, classes: int = 1000) -> onnx.ModelProto:
    """MobileNetV2-shaped: inverted residuals with depthwise 3x3 and ReLU6; the projection is
    linear (a signed map) and residual merges are signed too, so both reduction paths run."""
    g = _Net(seed)
    x = g.relu6(g.bn(g.conv("input", 3, 32, 3, 2), 32))
    cin = 32
    # (expansion, channels, repeats, stride) as in the MobileNetV2 paper.
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            y = x if t == 1 else g.relu6(g.bn(g.conv(x, cin, hidden, 1), hidden))
            y = g.relu6(g.bn(g.conv(y, hidden, hidden, 3, stride, group=hidden), hidden))
            y = g.bn(g.conv(y, hidden, c, 1), c, gamma=0.5)
            x = g.op("Add", [x, y], "add") if stride == 1 and cin == c else y
            cin = c
    x = g.relu6(g.bn(g.conv(x, cin, 1280, 1), 1280))
    return g.model(g.head(x, 1280, classes), size, classes, "mobilenet_v2")


def cifar_cnn(seed: int = 0) -> onnx.ModelProto:
    """A small VGG-style CNN for 32x32 inputs: 3 stages of two Conv->BN->Relu and a MaxPool."""
    g = _Net(seed)
    x, cin = "input", 3
    for width in (32, 64, 128):
        for _ in range(2):
            x = g.relu(g.bn(g.conv(x, cin, width, 3), width))
            cin = width
        x = g.op("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])
    return g.model(g.head(x, cin, 10), 32, 10, "cifar_cnn")


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A benchmark model: builder, input side, and batches per round (so a round takes ~1 s+)."""

    build: Callable[[], onnx.ModelProto]
    side: int
    batches: int


MODELS = {
    "resnet50": Spec(resnet50, 224, 1),
    "resnet18": Spec(resnet18, 224, 1),
    "mobilenet_v2": Spec(mobilenet_v2, 224, 3),
    "cifar_cnn": Spec(cifar_cnn, 32, 16),
}


def write_jpegs(folder: Path, count: int, side: int, seed: int = 0) -> Path:
    """`count` smooth random RGB JPEGs a bit larger than the model input (so they get resized)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    big = side + side // 7
    for i in range(count):
        coarse = rng.integers(0, 256, (big // 8 + 1, big // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((big, big), Image.Resampling.BICUBIC)
        img.save(folder / f"img_{i:05d}.jpg", quality=90)
    return folder


def input_batches(spec: Spec, batch: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, (batch, 3, spec.side, spec.side)).astype(np.float32) for _ in range(spec.batches)]


# --------------------------------------------------------------------------------------------
# Variants (in-process throughput)
# --------------------------------------------------------------------------------------------


def _plain_runner(path: Path, batches: list[np.ndarray]) -> Callable[[], None]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run() -> None:
        for x in batches:
            session.run(None, {name: x})
    return run


def _probe_runner(path: Path, batches: list[np.ndarray], layers: str, stats: tuple[str, ...]) -> tuple[Callable, int]:
    from onnx_linf.measure.preprocess import Preprocess
    from onnx_linf.measure.probe import Probe
    from onnx_linf.measure.sources import FeedSource
    from onnx_linf.model.load import load_model
    from onnx_linf.model.taps import find_taps

    model = load_model(path)
    taps = find_taps(model, layers)
    probe = Probe(model, taps, stats, provider="cpu")
    source = FeedSource(batches)
    pre = Preprocess(size=(batches[0].shape[2], batches[0].shape[3]))
    n = batches[0].shape[0]
    return (lambda: probe.measure(source, pre, n)), len(taps)


def _clamped_runner(path: Path, batches: list[np.ndarray], **options) -> tuple[Callable, int]:
    """Plain inference of the model `onnx-linf clamp` writes (by default both bounds at q = 100: a
    fixed strength, so no cross-fit runs inside the benchmark; the graph is the same at any q),
    bounds taken on the same batches: what the clamp costs a deployment."""
    import onnxruntime as ort

    from onnx_linf.commands.clamp import ClampConfig, clamp
    from onnx_linf.measure.sources import FeedSource
    from onnx_linf.rewrite.blocked import blocked_artifact

    blocked = options.pop("blocked", False)
    options = {"strength": 100.0, **options}
    result = clamp(path, FeedSource(batches), ClampConfig(provider="cpu", batch_size=batches[0].shape[0], **options))
    feed = [{result.proto.graph.input[0].name: batches[0]}]
    proto = blocked_artifact(result.proto, check=feed).proto if blocked else result.proto
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run() -> None:
        for x in batches:
            session.run(None, {name: x})
    return run, len(result.records)


def _reduce_runner(path: Path, batches: list[np.ndarray], stats: tuple[str, ...]) -> tuple[Callable, int]:
    """The naive in-graph form: ReduceMax(Abs)/ReduceL1/ReduceL2 per map, fed through the same loop."""
    from onnx_linf.measure.calibrate import run_batches
    from onnx_linf.measure.instrument import instrument
    from onnx_linf.measure.preprocess import Preprocess
    from onnx_linf.measure.session import create_session
    from onnx_linf.measure.sources import FeedSource
    from onnx_linf.measure.stats import StatsCollector
    from onnx_linf.model.load import load_model
    from onnx_linf.model.taps import find_taps

    model = load_model(path)
    taps = find_taps(model, "all")
    inst = instrument(model, taps, stats, method="reduce")
    session = create_session(model, inst.proto, "cpu")
    source = FeedSource(batches)
    pre = Preprocess(size=(batches[0].shape[2], batches[0].shape[3]))
    names = inst.output_names()

    def run() -> None:
        collector = StatsCollector(inst.outputs, {t.name: t.channels for t in taps})
        for values in run_batches(session, source, pre, names, batches[0].shape[0]):
            collector.update(values)
        collector.result()
    return run, len(taps)


def _raw_runner(path: Path, batches: list[np.ndarray]) -> tuple[Callable, int]:
    """Whole activations as graph outputs, reduced in numpy (float32, as a user would write it)."""
    from onnx_linf.measure.instrument import instrument
    from onnx_linf.measure.session import create_session
    from onnx_linf.model.load import load_model
    from onnx_linf.model.taps import find_taps

    model = load_model(path)
    taps = find_taps(model, "all")
    inst = instrument(model, taps, ("raw",))
    session = create_session(model, inst.proto, "cpu")
    names = inst.output_names()

    def run() -> None:
        for x in batches:
            for a in session.run(names, x):
                np.abs(a).max(axis=(2, 3))
                np.abs(a).sum(axis=(2, 3))
                np.sqrt(np.square(a).sum(axis=(2, 3)))
    return run, len(taps)


@dataclass
class Row:
    label: str
    taps: int | str
    stats: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def timed_round(variants: list[tuple[Row, Callable[[], None]]], r: int) -> None:
    """Run every variant once, starting at a different one each round (neighbours share the
    machine's load), and add its wall and process CPU seconds to its row."""
    k = r % len(variants)
    for row, run in variants[k:] + variants[:k]:
        u0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        run()
        row.wall.append(time.perf_counter() - t0)
        u1 = resource.getrusage(resource.RUSAGE_SELF)
        row.cpu.append(u1.ru_utime + u1.ru_stime - u0.ru_utime - u0.ru_stime)


def throughput(name: str, path: Path, spec: Spec, batch: int, rounds: int, detail: bool) -> tuple[list[Row], int]:
    from onnx_linf.model.load import load_model
    from onnx_linf.model.taps import find_taps

    batches = input_batches(spec, batch)
    variants: list[tuple[Row, Callable[[], None]]] = [(Row("plain inference", "-", "-"), _plain_runner(path, batches))]
    for layers in ("last", "all"):
        run, n = _probe_runner(path, batches, layers, DEFAULT_STATS)
        variants.append((Row(f"scan --layers {layers}", n, ",".join(DEFAULT_STATS)), run))
    if detail:
        # What each statistic and the branch maps cost on top of the default.
        model = load_model(path)
        has_branches = len(find_taps(model, "all+branches")) > len(find_taps(model, "all"))
        for layers, stats in (("all", ("linf",)), ("all", ALL_NORMS),
                              ("all+branches", DEFAULT_STATS), ("all+branches", ALL_NORMS)):
            if layers == "all+branches" and not has_branches:
                continue
            run, n = _probe_runner(path, batches, layers, stats)
            variants.append((Row(f"scan --layers {layers}", n, ",".join(stats)), run))
        run, n = _reduce_runner(path, batches, ALL_NORMS)
        variants.append((Row("naive in-graph Reduce* (all maps)", n, ",".join(ALL_NORMS)), run))
    run, n = _raw_runner(path, batches)
    variants.append((Row("whole activations + numpy", n, ",".join(ALL_NORMS)), run))
    run, n = _clamped_runner(path, batches, bounds=("position",))
    variants.append((Row("clamped model (position, q=100), plain inference", n, "-"), run))
    run, n = _clamped_runner(path, batches, excess="clip")
    variants.append((Row("clamped model (position + channel-mean, --excess clip), plain inference", n, "-"), run))
    run, n = _clamped_runner(path, batches)
    variants.append((Row("clamped model (position + channel-mean, default: fold), plain inference", n, "-"), run))
    run, n = _clamped_runner(path, batches, blocked=True)
    variants.append((Row("the same, blocked CPU artefact (`rewrite.blocked_artifact`)", n, "-"), run))
    for _, run in variants:  # warm-up: first runs allocate
        run()
    for r in range(rounds):
        timed_round(variants, r)
        print(f"  {name}: round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return [row for row, _ in variants], batch * spec.batches


def exactness(path: Path, side: int) -> dict[str, float]:
    """Largest relative difference of each pooled statistic to float64 numpy on the same session's raw map."""
    from onnx_linf.measure.instrument import instrument
    from onnx_linf.measure.session import create_session
    from onnx_linf.model.load import load_model
    from onnx_linf.model.taps import find_taps

    model = load_model(path)
    taps = find_taps(model, "all+branches")  # signed branch maps take other paths: check them too
    inst = instrument(model, taps, ("linf", "l1", "l2", "raw"))
    x = np.random.default_rng(1).normal(0, 1, (2, 3, side, side)).astype(np.float32)
    values = dict(zip(inst.output_names(), create_session(model, inst.proto, "cpu").run(inst.output_names(), x)))
    raw = {ref.tap: values[k].astype(np.float64) for k, ref in inst.outputs.items() if ref.stat == "raw"}
    worst: dict[str, float] = {}
    for k, ref in inst.outputs.items():
        if ref.stat == "raw":
            continue
        a = raw[ref.tap]
        exact = {"linf": np.abs(a).max(axis=(2, 3)), "l1": np.abs(a).sum(axis=(2, 3)),
                 "l2": np.sqrt((a * a).sum(axis=(2, 3)))}[ref.stat]
        rel = float(np.max(np.abs(values[k] - exact) / np.maximum(np.abs(exact), 1e-30)))
        worst[ref.stat] = max(worst.get(ref.stat, 0.0), rel)
    return worst


# --------------------------------------------------------------------------------------------
# End to end from JPEG files (in-process)
# --------------------------------------------------------------------------------------------


def end_to_end(path: Path, folder: Path, batch: int, rounds: int) -> tuple[list[Row], int, dict[str, list[float]]]:
    """Steady-state loops over the JPEG folder (sessions made beforehand), and the one-time setup."""
    from onnx_linf.commands.options import PreprocessOptions
    from onnx_linf.measure.calibrate import run_batches
    from onnx_linf.measure.probe import Probe
    from onnx_linf.measure.session import create_session
    from onnx_linf.measure.sources import ImageFolder, _decode
    from onnx_linf.model.load import load_model
    from onnx_linf.model.taps import find_taps

    model = load_model(path)
    pre = PreprocessOptions().resolve(model)
    plain = create_session(model, None, "cpu")
    probe = Probe(model, find_taps(model, "all"), DEFAULT_STATS, provider="cpu")
    out = [o.name for o in plain.inner.get_outputs()]
    files = sorted(folder.glob("*.jpg"))

    def sequential() -> None:
        for i in range(0, len(files), batch):
            pixels = np.stack([_decode(f, pre.size, "RGB") for f in files[i:i + batch]])
            plain.run(out, pre.apply(pixels))

    def pipelined() -> None:
        for _ in run_batches(plain, ImageFolder(folder, pre.size), pre, out, batch):
            pass

    def scan_all() -> None:
        probe.measure(ImageFolder(folder, pre.size), pre, batch)

    variants = [(Row("plain, same loader as the scan (overlapped)", "-", "-"), pipelined),
                (Row("plain, decode then infer (sequential)", "-", "-"), sequential),
                (Row("scan --layers all (decode overlapped)", len(probe.taps), ",".join(DEFAULT_STATS)), scan_all)]
    setup: dict[str, list[float]] = {"plain session": [], "scan setup (load, find maps, instrument, session)": []}
    for _, run in variants:
        run()
    for r in range(rounds):
        timed_round(variants, r)
        t0 = time.perf_counter()
        create_session(load_model(path), None, "cpu")
        t1 = time.perf_counter()
        fresh = load_model(path)
        Probe(fresh, find_taps(fresh, "all"), provider="cpu")
        setup["plain session"].append(t1 - t0)
        setup["scan setup (load, find maps, instrument, session)"].append(time.perf_counter() - t1)
        print(f"  end to end: round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return [row for row, _ in variants], len(files), setup


# --------------------------------------------------------------------------------------------
# Peak memory (one child process per variant)
# --------------------------------------------------------------------------------------------

#: Plain inference child: only numpy and onnxruntime imported, session straight from the file.
PLAIN_CHILD = """
import sys, numpy as np, onnxruntime as ort
path, batch, side, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).normal(0, 1, (batch, 3, side, side)).astype(np.float32)
for _ in range(runs):
    s.run(None, {s.get_inputs()[0].name: x})
print("VmHWM", next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


def child(args: argparse.Namespace) -> None:
    """Run one memory variant in this (child) process, then print its peak RSS."""
    try:
        _child(args)
    finally:
        print("VmHWM", _vm_hwm_kb(), flush=True)


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmHWM")))


def _child(args: argparse.Namespace) -> None:
    path, batch, runs = Path(args.child_model), args.batch, args.child_runs
    variant = args.child
    if variant == "cli":
        from onnx_linf.cli.app import main

        sys.argv = ["onnx-linf", "scan", str(path), "--calib", args.child_folder, "--layers", "all",
                    "--batch-size", str(batch), "--provider", "cpu", "--quiet"]
        try:
            main()
        except SystemExit as exc:  # typer exits; 0 and 1 (flagged) are finished scans
            if exc.code not in (None, 0, 1):
                raise
        return
    from onnx_linf.measure.session import create_session

    side = args.child_side
    batches = [np.random.default_rng(0).normal(0, 1, (batch, 3, side, side)).astype(np.float32)] * runs
    if variant == "plain-lib":
        from onnx_linf.model.load import load_model

        model = load_model(path)
        session = create_session(model, None, "cpu")
        for x in batches:
            session.run(None, x)
    elif variant in ("last", "all", "all+branches"):
        run, _ = _probe_runner(path, batches, variant, DEFAULT_STATS)
        run()
    elif variant == "reduce":
        run, _ = _reduce_runner(path, batches, ALL_NORMS)
        run()
    elif variant == "raw":
        run, _ = _raw_runner(path, batches)
        run()
    elif variant == "clamp":
        from onnx_linf import VerificationError, clamp

        try:
            clamp(path, args.child_folder, output=path.with_name(path.stem + "_clamped.onnx"), force=True)
        except VerificationError as exc:
            # Random weights and random images can fail the agreement check at the very end (the
            # MobileNet: 18% changed); every pass has run by then, so the peak is still the clamp's.
            print(f"clamp refused to write its output: {exc}", file=sys.stderr)
    else:
        raise SystemExit(f"unknown child variant {variant}")


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak RSS of a child process: its own VmHWM, printed as it exits.

    Not `os.wait4`'s ru_maxrss: Linux carries the high-water mark across fork + exec, so every
    child would report at least this (large) parent's RSS at the time of the fork.
    """
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(cmd[:6])} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    peak = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("VmHWM")]
    return int(peak[-1]) / 1024


def memory(path: Path, spec: Spec, batch: int, runs: int, repeats: int = 3) -> dict[str, float]:
    """Peak RSS per variant: the median over `repeats` child processes (identical children differ by
    tens of MB: ORT's threads and the C allocator's per-thread arenas)."""
    base = [sys.executable, __file__, "--batch", str(batch), "--child-model", str(path),
            "--child-side", str(spec.side), "--child-runs", str(runs), "--child"]
    commands = {"plain": [sys.executable, "-c", PLAIN_CHILD, str(path), str(batch), str(spec.side), str(runs)]}
    commands.update({v: base + [v] for v in ("plain-lib", "last", "all", "all+branches", "raw")})
    return {v: statistics.median(peak_rss_mb(cmd) for _ in range(repeats)) for v, cmd in commands.items()}


def clamp_memory(path: Path, spec: Spec, work: Path, images: int) -> float:
    """Peak RSS of `onnx_linf.clamp` (defaults) in a child, calibrating on `images` random uint8 images."""
    calib = work / f"random_{spec.side}_{images}.npy"
    if not calib.exists():
        np.save(calib, np.random.default_rng(0).integers(0, 256, (images, spec.side, spec.side, 3), dtype=np.uint8))
    return peak_rss_mb([sys.executable, __file__, "--child-model", str(path), "--child-side", str(spec.side),
                        "--child", "clamp", "--child-folder", str(calib)])


def memory_scaling(path: Path, folders: dict[int, Path], batch: int) -> dict[int, float]:
    """Peak RSS of the real CLI scanning N and 10N JPEG files."""
    return {n: peak_rss_mb([sys.executable, __file__, "--batch", str(batch), "--child-model", str(path),
                            "--child-folder", str(folder), "--child", "cli"])
            for n, folder in folders.items()}


# --------------------------------------------------------------------------------------------
# Where the time goes (ORT profiler)
# --------------------------------------------------------------------------------------------


def profile(path: Path, spec: Spec, batch: int, rounds: int) -> list[str]:
    """Kernel time per op type for plain inference, both in-graph scan forms (all maps, default
    statistics) and the two clamped models, sessions run alternately; plus the number of
    full-size NCHWc->NCHW reorders."""
    import collections

    import onnxruntime as ort

    from onnx_linf.commands.clamp import ClampConfig, clamp
    from onnx_linf.measure.instrument import instrument
    from onnx_linf.measure.sources import FeedSource
    from onnx_linf.model.load import load_model
    from onnx_linf.model.taps import find_taps
    from onnx_linf.rewrite.blocked import blocked_artifact

    model = load_model(path)
    taps = find_taps(model, "all")
    protos = {"plain": model.proto.SerializeToString()}
    for method in ("reduce", "pool"):
        protos[method] = instrument(model, taps, DEFAULT_STATS, method=method).serialize()
    x = np.random.default_rng(0).normal(0, 1, (batch, 3, spec.side, spec.side)).astype(np.float32)
    # The models `clamp` writes (q = 100 on this batch), run as plain inference.
    for key, bounds in (("clamp position", ("position",)), ("clamp both", ("position", "channel-mean"))):
        clamped = clamp(path, FeedSource([x]), ClampConfig(provider="cpu", batch_size=batch, strength=100.0,
                                                           bounds=bounds)).proto
        protos[key] = clamped.SerializeToString()
    protos["clamp both, blocked"] = blocked_artifact(clamped).proto.SerializeToString()
    sessions = {}
    for key, payload in protos.items():
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.log_severity_level = 3
        options.enable_mem_pattern = False
        sessions[key] = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    for _ in range(rounds + 1):
        for s in sessions.values():
            s.run(None, {s.get_inputs()[0].name: x})
    per_op: dict[str, dict[str, list[float]]] = {}
    totals: dict[str, list[float]] = {}
    full_reorders: dict[str, int] = {}
    # Larger than any pooled [N, C] result (C <= 4096): a whole map converted back to NCHW.
    full_size = batch * 4 * 4096
    for key, s in sessions.items():
        with open(s.end_profiling()) as f:
            events = json.load(f)
        os.remove(f.name)
        runs = [e for e in events if e.get("name") == "model_run"][1:]  # the first run allocates
        totals[key] = [e["dur"] / 1000 for e in runs]
        by_run: list[collections.Counter] = [collections.Counter() for _ in runs]
        last = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                and runs[-1]["ts"] <= e["ts"] <= runs[-1]["ts"] + runs[-1]["dur"]]
        full_reorders[key] = sum(1 for e in last if e["args"]["op_name"] == "ReorderOutput"
                                 and int(e["args"].get("output_size", 0)) > full_size)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                for i, r in enumerate(runs):
                    if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]:
                        by_run[i][e["args"]["op_name"]] += e["dur"] / 1000
        for op in set().union(*by_run):
            per_op.setdefault(op, {})[key] = [c[op] for c in by_run]
    keys = list(sessions)
    lines = ["| op type | " + " | ".join(f"{k} (ms)" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    ops = sorted(per_op, key=lambda op: -max(statistics.median(v) for v in per_op[op].values()))
    for op in ops:
        cells = [f"{statistics.median(per_op[op][k]):.0f}" if k in per_op[op] else "" for k in keys]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| **whole run** | " + " | ".join(f"**{statistics.median(totals[k]):.0f}**" for k in keys) + " |")
    lines.append("| full-size NCHWc->NCHW reorders | " + " | ".join(str(full_reorders[k]) for k in keys) + " |")
    return lines


def latency(path: Path, spec: Spec, runs: int) -> dict[str, list[float]]:
    """Batch-1 latency of the original, the sanitized model (default `clamp`, both bounds, q = 100
    on 16 calibration images) and its blocked CPU artefact: what a serving user sees. One image per
    request, the sessions taking turns request by request (the order rotating, so all see the same
    load), `runs` requests each after 10 warm-up requests; seconds per request."""
    import onnxruntime as ort

    from onnx_linf.commands.clamp import ClampConfig, clamp
    from onnx_linf.measure.sources import FeedSource
    from onnx_linf.rewrite.blocked import blocked_artifact

    calib = input_batches(spec, 16)[:1]
    sanitized = clamp(path, FeedSource(calib), ClampConfig(provider="cpu", batch_size=16, strength=100.0)).proto
    artefact = blocked_artifact(sanitized).proto
    sessions = {"original": ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]),
                "sanitized": ort.InferenceSession(sanitized.SerializeToString(), providers=["CPUExecutionProvider"]),
                "blocked": ort.InferenceSession(artefact.SerializeToString(), providers=["CPUExecutionProvider"])}
    images = np.random.default_rng(2).normal(0, 1, (runs, 1, 3, spec.side, spec.side)).astype(np.float32)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    keys = list(sessions)
    for i in range(runs + 10):
        order = keys[i % len(keys):] + keys[:i % len(keys)]
        for key in order:
            s = sessions[key]
            t0 = time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: images[i % runs]})
            if i >= 10:
                times[key].append(time.perf_counter() - t0)
    return times


def latency_table(results: dict[str, dict[str, list[float]]]) -> list[str]:
    lines = ["| model | original p50 / p99 (ms) | sanitized p50 / p99 (ms) | original / sanitized, p50 / p99 "
             "| blocked artefact p50 / p99 (ms) | original / artefact, p50 / p99 |", "|---|---|---|---|---|---|"]
    for name, t in results.items():
        q = {k: np.percentile(np.array(v) * 1000, [50, 99]) for k, v in t.items()}
        o, s, b = q["original"], q["sanitized"], q["blocked"]
        lines.append(f"| {name} | {o[0]:.2f} / {o[1]:.2f} | {s[0]:.2f} / {s[1]:.2f} | {o[0] / s[0]:.2f} / "
                     f"{o[1] / s[1]:.2f} | {b[0]:.2f} / {b[1]:.2f} | {o[0] / b[0]:.2f} / {o[1] / b[1]:.2f} |")
    return lines


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _med(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def table(rows: list[Row], images: int) -> list[str]:
    plain = rows[0] if rows[0].label.startswith("plain") and "sequential" not in rows[0].label else rows[1]
    lines = ["| variant | maps | statistics | images/s | vs plain (wall) | vs plain (CPU time) "
             "| vs plain (best round) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        ips = [images / t for t in row.wall]
        wall = [p / t for p, t in zip(plain.wall, row.wall)]
        cpu = [p / t for p, t in zip(plain.cpu, row.cpu)]
        lines.append(f"| {row.label} | {row.taps} | {row.stats} | {_med(ips, '{:.1f}')} | "
                     f"{_med(wall)} | {_med(cpu)} | {min(plain.wall) / min(row.wall):.2f} |")
    return lines


def cpu_pressure() -> str:
    """Share of time some runnable task waited for a CPU (Linux PSI), i.e. how busy the machine was."""
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()
        return "CPU pressure (share of time tasks waited for a core) " + ", ".join(
            f"{k.split('=')[0]} {float(k.split('=')[1]):.0f}%" for k in some[1:4])
    except (OSError, IndexError, ValueError):
        return "CPU pressure unknown"


def machine() -> str:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f", {int(next(line.split()[1] for line in f if line.startswith('MemTotal'))) // 2**20} GiB RAM"
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores{mem}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, ONNX Runtime {ort.__version__}, numpy {np.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--detail", nargs="?", const="all", default="resnet50",
                        help="models that also get the per-statistic / per-map-kind / naive rows "
                             "(default: resnet50; bare --detail: all)")
    parser.add_argument("--profile", action="store_true",
                        help="also break the first model's run time down by op type (ORT profiler)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--latency-runs", type=int, default=200,
                        help="batch-1 requests per model for the latency table (0: no latency table)")
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--e2e-model", default="resnet50")
    parser.add_argument("--e2e-images", type=int, default=32)
    parser.add_argument("--e2e-rounds", type=int, default=5)
    parser.add_argument("--scaling-model", default="mobilenet_v2",
                        help="model whose CLI scan is run on N and 10N JPEG files for peak memory")
    parser.add_argument("--scaling-images", type=int, default=128)
    parser.add_argument("--memory-runs", type=int, default=2, help="batches each memory child runs")
    parser.add_argument("--memory-repeats", type=int, default=3, help="child processes per memory variant (median)")
    parser.add_argument("--clamp-memory", type=int, default=0, metavar="IMAGES",
                        help="also measure the peak RSS of a default clamp calibrated on this many random images "
                             "(0: skip; 160 takes about 1 min on ResNet-18 and 6 on MobileNetV2, 2 cores)")
    parser.add_argument("--cache", type=Path, help="keep built models and JPEGs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--child-side", type=int, default=224, help=argparse.SUPPRESS)
    parser.add_argument("--child-runs", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    detail = set(MODELS) if args.detail == "all" else set(args.detail.split(","))
    work = Path(tempfile.mkdtemp(prefix="onnx-linf-perf-")) if args.cache is None else args.cache
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_before = os.getloadavg()
    report = ["## Throughput (in one process, variants interleaved round by round)", "",
              f"Batch {args.batch}, {args.rounds} rounds; medians [min-max]. \"vs plain\" is plain time / "
              "variant time per round (1.00 = as fast as plain inference); the CPU-time column is the same "
              "ratio on process CPU seconds; \"best round\" is the fastest plain round over the fastest round of the "
              "variant, the estimate least disturbed by other load on a shared machine.", ""]
    try:
        paths = {}
        for name in sorted(set(names) | ({args.e2e_model} if not args.no_e2e else set())
                           | ({args.scaling_model} if not args.no_memory else set())):
            paths[name] = work / f"{name}.onnx"
            if not paths[name].exists():
                onnx.save(MODELS[name].build(), str(paths[name]))
        mem_rows = []
        for name in names:
            spec = MODELS[name]
            print(f"{name}: throughput", file=sys.stderr, flush=True)
            rows, images = throughput(name, paths[name], spec, args.batch, args.rounds, name in detail)
            worst = exactness(paths[name], spec.side)
            report += [f"### {name} ({images} images per round)", "", *table(rows, images), "",
                       "Largest relative difference to float64 numpy on the raw maps "
                       "(all maps and branches, same session): "
                       + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()), ""]
            if not args.no_memory:
                print(f"{name}: memory", file=sys.stderr, flush=True)
                mem_rows.append((name, memory(paths[name], spec, args.batch, args.memory_runs, args.memory_repeats)))
                if args.clamp_memory:
                    print(f"{name}: clamp memory", file=sys.stderr, flush=True)
                    mem_rows[-1][1]["clamp"] = clamp_memory(paths[name], spec, work, args.clamp_memory)
        if args.latency_runs > 0:
            lat = {}
            for name in names:
                print(f"{name}: latency", file=sys.stderr, flush=True)
                lat[name] = latency(paths[name], MODELS[name], args.latency_runs)
            report += [f"## Latency at batch 1 ({args.latency_runs} requests per model)", "",
                       "One image per request, the original, the sanitized model (default `clamp`: position and "
                       "channel-mean bounds on every map) and its blocked CPU artefact taking turns request by "
                       "request; percentiles over the requests.", "", *latency_table(lat), ""]
        if args.profile:
            name = names[0]
            print(f"{name}: profile", file=sys.stderr, flush=True)
            report += [f"## Where the time goes ({name}, batch {args.batch}, all maps, {','.join(DEFAULT_STATS)})", "",
                       "ORT profiler, kernel time per op type, median of the runs (sessions run alternately). "
                       "`reduce` is the naive ReduceMax(Abs)/ReduceL1/ReduceL2 form, `pool` the default; "
                       "`clamp position` and `clamp both` are the models `onnx-linf clamp` writes (q = 100, "
                       "position bounds / both bounds), run as plain inference.", "",
                       *profile(paths[name], MODELS[name], args.batch, args.rounds), ""]
        if mem_rows:
            report += ["## Peak RSS (MB, one process per variant)", "",
                       f"Batch {args.batch}, {args.memory_runs} batches per process, median of {args.memory_repeats} "
                       "processes. \"plain\" is ONNX Runtime alone "
                       "(session from the file); \"plain via onnx-linf\" also holds the model in Python, as every "
                       "scan does.", "",
                       "| model | plain | plain via onnx-linf | scan last | scan all | scan all+branches "
                       "| whole activations + numpy | scan all / plain |", "|---|---|---|---|---|---|---|---|"]
            for name, m in mem_rows:
                report.append(f"| {name} | {m['plain']:.0f} | {m['plain-lib']:.0f} | {m['last']:.0f} | "
                              f"{m['all']:.0f} | {m['all+branches']:.0f} | {m['raw']:.0f} | "
                              f"{m['all'] / m['plain']:.2f} |")
            report.append("")
            if args.clamp_memory:
                report += [f"Peak RSS of a default `clamp` (`onnx_linf.clamp`, cross-fit included) calibrated on "
                           f"{args.clamp_memory} random uint8 images, one process per model:", "",
                           "| model | plain | clamp | clamp / plain |", "|---|---|---|---|",
                           *[f"| {name} | {m['plain']:.0f} | {m['clamp']:.0f} | {m['clamp'] / m['plain']:.1f} |"
                             for name, m in mem_rows], ""]
        if not args.no_e2e:
            spec = MODELS[args.e2e_model]
            folder = write_jpegs(work / f"jpeg_{args.e2e_model}_{args.e2e_images}", args.e2e_images, spec.side)
            print("end to end", file=sys.stderr, flush=True)
            rows, images, setup = end_to_end(paths[args.e2e_model], folder, args.batch, args.e2e_rounds)
            cores = os.cpu_count() or 1
            busy = ", ".join(f"{r.label}: {statistics.median([c / w / cores for c, w in zip(r.cpu, r.wall)]):.0%}"
                             for r in rows)
            report += [f"## End to end from JPEG files ({args.e2e_model}, {images} files, "
                       f"{args.e2e_rounds} rounds)", "",
                       "Decode (Pillow), resize and preprocessing included on every row, sessions created "
                       "beforehand; \"vs plain\" compares with the overlapped plain row.", "",
                       *table(rows, images), "",
                       f"CPU busy (process CPU time / wall time / {cores} cores): {busy}.", "",
                       "One-time setup, seconds: " + ", ".join(f"{k} {_med(v)}" for k, v in setup.items()), ""]
        if not args.no_memory:
            spec = MODELS[args.scaling_model]
            n = args.scaling_images
            folders = {k: write_jpegs(work / f"jpeg_{args.scaling_model}_{k}", k, spec.side) for k in (n, 10 * n)}
            print("memory scaling", file=sys.stderr, flush=True)
            peaks = memory_scaling(paths[args.scaling_model], folders, args.batch)
            report += [f"## Peak RSS of `onnx-linf scan --layers all` vs number of images ({args.scaling_model})", "",
                       "The loader keeps a bounded window of batches in flight (decode-ahead plus prefetch), "
                       "so the peak grows until that window is full (a few batches) and not after.", "",
                       "| images | peak RSS (MB) |", "|---|---|",
                       *[f"| {k} | {v:.0f} |" for k, v in peaks.items()], ""]
    finally:
        if args.cache is None:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    header = ["# onnx-linf performance benchmark", "",
              f"Machine: {machine()}.", "",
              f"Load average (1 min) at start / end: {load_before[0]:.1f} / {load_after[0]:.1f}; "
              f"{cpu_pressure()} at the end; run took {(time.time() - started) / 60:.1f} min.", "",
              "Command: `python benchmarks/perf.py " + " ".join(sys.argv[1:]) + "`", ""]
    text = "\n".join(header + report)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
