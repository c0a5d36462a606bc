"""The Ray engine on a real local Ray cluster (``ray.init(num_cpus=2)``, one for the module).

Guards: statistics merged from shards equal one process (max/min/top-k bit-identical, Welford
moments within 1e-6 relative) for shard counts that do not divide the image count; a worker killed
mid-run is restarted, its shard retried, and the result is still exact; a folder scan fanned out
as one Ray task per model equals the serial one; the extra missing and an unreachable cluster are
one-line errors with exit code 2.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from onnx_linf.cli.app import app
from onnx_linf.commands.clamp import ClampConfig, clamp
from onnx_linf.commands.evaluate import evaluate_model
from onnx_linf.commands.options import PreprocessOptions, ScanConfig
from onnx_linf.commands.scan import scan
from onnx_linf.commands.scan_many import scan_many
from onnx_linf.measure.calibrate import Progress
from onnx_linf.measure.engine import EngineOptions, tree_merge
from onnx_linf.measure.probe import Probe
from onnx_linf.measure.ray_engine import MISSING_EXTRA, RayEngine
from onnx_linf.measure.sources import ArraySource, FeedSource
from onnx_linf.model.load import load_model
from onnx_linf.model.taps import find_taps

import models

runner = CliRunner()
HAVE_RAY = __import__("importlib").util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install 'onnx-linf[ray]')")

#: Every kind of statistic a `ChannelStats` holds: moments, per-position and per-channel extremes,
#: top-k per position and per image.
STATS = ("linf", "l1", "l2", "pos_max", "pos_min", "chan_max", "chan_min", "pos_top", "pos_bottom",
         "img_max", "img_min")


@pytest.fixture(scope="module")
def cluster():
    if not HAVE_RAY:
        pytest.skip("ray is not installed (pip install 'onnx-linf[ray]')")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def assert_same_stats(local, sharded):
    assert local.keys() == sharded.keys()
    for tap, a in local.items():
        b = sharded[tap]
        assert a.count == b.count
        for attr in ("pos_max", "pos_min", "chan_max", "chan_min"):
            x, y = getattr(a, attr), getattr(b, attr)
            assert (x is None) == (y is None) and (x is None or np.array_equal(x, y)), (tap, attr)
        assert a.top.keys() == b.top.keys()
        for name, t in a.top.items():
            assert t.count == b.top[name].count
            assert np.array_equal(np.sort(t.values, axis=0), np.sort(b.top[name].values, axis=0)), (tap, name)
        assert a.moments.keys() == b.moments.keys()
        for name, m in a.moments.items():
            n = b.moments[name]
            assert m.count == n.count
            assert np.array_equal(m.max, n.max) and np.array_equal(m.min, n.min)
            # Sums in another order: equal within float rounding, relative to the values' scale.
            scale = max(1.0, float(np.abs(m.mean).max()))
            assert np.allclose(m.mean, n.mean, rtol=1e-6, atol=1e-6 * scale), (tap, name)
            assert np.allclose(m.m2, n.m2, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(m.m2).max()))), (tap, name)


def test_missing_extra_is_one_line_error(fixtures_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does without the extra
    result = runner.invoke(app, ["scan", str(fixtures_dir / "digits_badnets.onnx"), "--calib",
                                 str(fixtures_dir / "digits_calib"), "--ray"])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error:") and MISSING_EXTRA in result.stderr.replace("\n", " ")
    assert "Traceback" not in result.stderr


@needs_ray
def test_unreachable_cluster_is_one_line_error(fixtures_dir, monkeypatch):
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray is already connected in this process")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    result = runner.invoke(app, ["scan", str(fixtures_dir / "digits_badnets.onnx"), "--calib",
                                 str(fixtures_dir / "digits_calib"), "--ray"])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error:") and "cannot reach the Ray cluster" in result.stderr
    assert "Traceback" not in result.stderr
    assert not ray.is_initialized()


def test_ray_workers_needs_ray(fixtures_dir):
    result = runner.invoke(app, ["scan", str(fixtures_dir / "digits_badnets.onnx"), "--calib",
                                 str(fixtures_dir / "digits_calib"), "--ray-workers", "2"])
    assert result.exit_code == 2 and "--ray-workers and --ray-gpus need --ray" in result.stderr


def test_tree_merge_is_fixed_by_the_order():
    # ((0 1)(2 3))(4): the same parts in the same order give the same tree, whatever arrives first.
    seen = []
    assert tree_merge(list("abcde"), lambda a, b: seen.append((a, b)) or f"({a}{b})") == "(((ab)(cd))e)"
    assert seen == [("a", "b"), ("c", "d"), ("(ab)", "(cd)"), ("((ab)(cd))", "e")]


def test_shards_equal_one_process(cluster, fixtures_dir, tmp_path):
    # Pixel arrays here; image folders (decoded by the workers) in the scan and clamp test below.
    model = load_model(fixtures_dir / "digits_badnets.onnx")
    taps = find_taps(model, "all")
    pre = PreprocessOptions().resolve(model)
    x = np.random.default_rng(0).integers(0, 256, (150, 16, 16, 1), dtype=np.uint8)
    np.save(tmp_path / "px.npy", x)
    source = ArraySource(tmp_path / "px.npy", pre.size, pre.channels)  # 150 images: 4 shards of 37-38
    local = Probe(model, taps, STATS, "cpu", topk=5).measure(source, pre, 16)
    engine = RayEngine(EngineOptions("ray", workers=2, shards=4))
    sharded = Probe(model, taps, STATS, "cpu", topk=5, engine=engine).measure(source, pre, 16)
    assert_same_stats(local, sharded)
    (run,) = engine.runs
    assert run.shards == 4 and run.images_per_shard == [38, 38, 37, 37]


def test_scan_and_clamp_through_ray(cluster, fixtures_dir):
    model, calib = fixtures_dir / "digits_badnets.onnx", fixtures_dir / "digits_calib"
    ray_engine = EngineOptions("ray", workers=2, shards=3)
    local = scan(model, calib, ScanConfig(stats=("linf", "l1", "l2"))).to_dict()
    sharded = scan(model, calib, ScanConfig(stats=("linf", "l1", "l2"), engine=ray_engine)).to_dict()
    engine = sharded["calibration"].pop("engine")
    assert "engine" not in local["calibration"]  # the local report is unchanged
    assert engine["name"] == "ray" and engine["workers"] == 2
    assert engine["passes"] == [{"shards": 3, "images_per_shard": [100, 100, 100],
                                 "worker_processes": engine["passes"][0]["worker_processes"],
                                 "provider": "CPUExecutionProvider"}]
    assert sharded["policy"] == local["policy"] and sharded["calibration"] == local["calibration"]
    for a, b in zip(local["taps"], sharded["taps"]):
        assert a["flagged"] == b["flagged"]
        for stat, agg in a["stats"].items():
            for key, value in agg.items():
                assert np.allclose(value, b["stats"][stat][key], rtol=1e-6, atol=1e-9), (a["tap"], stat, key)

    want = clamp(model, calib, position_clamp(quantile=99.0))  # bounds from exact top-k order statistics
    got = clamp(model, calib, position_clamp(quantile=99.0, engine=ray_engine))
    for a, b in zip(want.bounds, got.bounds):
        assert np.array_equal(a.hi, b.hi) and (a.lo is None) == (b.lo is None)
        assert a.lo is None or np.array_equal(a.lo, b.lo)
    assert got.report.calibration["engine"]["passes"][0]["images_per_shard"] == [100, 100, 100]


def test_evaluate_on_ray_counts_the_same(cluster, fixtures_dir):
    args = dict(trigger=fixtures_dir / "digits_badnets_trigger.png", mask=fixtures_dir / "digits_badnets_mask.png",
                target=0, limit=250)
    local = evaluate_model(fixtures_dir / "digits_badnets.onnx", fixtures_dir / "digits_test.npz", **args)
    sharded = evaluate_model(fixtures_dir / "digits_badnets.onnx", fixtures_dir / "digits_test.npz", **args,
                             engine=EngineOptions("ray", workers=2, shards=3))
    assert sharded.evaluation == local.evaluation  # integer counts: exact


def position_clamp(**options) -> ClampConfig:
    """The position clamp alone: a channel-mean bound, where there is one, is cross-fitted in this process."""
    if "bounds" in {f.name for f in dataclasses.fields(ClampConfig)}:
        options["bounds"] = ("position",)
    return ClampConfig(**options)


def heavy_cnn():
    """input[N,3,32,32] -> conv 3->32 -> relu -> conv 32->48 -> relu -> GAP -> Flatten -> Gemm[4]

    Big enough that a shard of 60 images takes a noticeable time, so a worker can be killed mid-shard.
    """
    g = models.GraphBuilder(3)
    x = g.node("Relu", [g.conv("input", 3, 32, "c1")], "r1")
    x = g.node("Relu", [g.conv(x, 32, 48, "c2")], "r2")
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x], "gap")], "flat", axis=1)
    return g.model(["N", 3, 32, 32], g.gemm(x, 48, 4, "fc"), ["N", 4])


def worker_pids() -> list[int]:
    """Processes of this cluster's shard actors (Ray titles them after the actor class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::MapWorker(MapBatches(ShardWorker))"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


class KillAfterFirstShard(Progress):
    """Kills the shard actors (SIGKILL) as soon as the first shard's result reaches the driver.

    All of them: which one holds the remaining shards is Ray Data's choice (an idle one, or a
    lingering actor process of an earlier pipeline, would prove nothing).
    """

    def __init__(self) -> None:
        self.alive: list[int] = []

    def advance(self, n: int) -> None:
        if not self.alive:
            self.alive = worker_pids()
            for pid in self.alive:
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds actor processes through /proc")
def test_killed_worker_is_retried_and_exact(cluster, model_file):
    model = load_model(model_file(heavy_cnn()))
    taps = find_taps(model, "all")
    pre = PreprocessOptions().resolve(model)
    source = FeedSource([np.random.default_rng(1).normal(size=(365, 3, 32, 32)).astype(np.float32)])
    stats = ("linf", "l1", "pos_max", "pos_top")
    local = Probe(model, taps, stats, "cpu", topk=3).measure(source, pre, 32)
    engine = RayEngine(EngineOptions("ray", workers=2, shards=12))  # 365 = 12 shards of 30-31
    killer = KillAfterFirstShard()
    sharded = Probe(model, taps, stats, "cpu", topk=3, engine=engine).measure(source, pre, 16, progress=killer)
    assert killer.alive
    assert_same_stats(local, sharded)
    (run,) = engine.runs
    assert run.shards == 12 and sum(run.images_per_shard) == 365
    # Unfinished shards came back from restarted actors: processes that were not alive at the kill.
    assert set(run.shard_workers) - set(killer.alive), run


def scaling_commands() -> list[str]:
    """The onnx-linf commands of the README's "Scaling out" section."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, flags=re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("onnx-linf ")]


def test_readme_scaling_commands_run(cluster, fixtures_dir, tmp_path, monkeypatch):
    commands = scaling_commands()
    assert len(commands) == 3 and all("--ray" in c for c in commands)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "fixtures").symlink_to(fixtures_dir)
    (tmp_path / "models").mkdir()
    shutil.copy(fixtures_dir / "digits_clean.onnx", tmp_path / "models" / "digits_clean.onnx")
    for command in commands:
        result = runner.invoke(app, shlex.split(command)[1:])
        assert result.exit_code == 0, f"{command}\n{result.stderr}"
    assert (tmp_path / "safe.onnx").is_file()


def test_folder_scan_one_task_per_model_equals_serial(cluster, fixtures_dir, tmp_path):
    for name in ("digits_badnets", "digits_clean"):
        shutil.copy(fixtures_dir / f"{name}.onnx", tmp_path / f"{name}.onnx")
    calib = fixtures_dir / "digits_calib"
    serial = scan_many(tmp_path, calib, cli={"limit": 120})
    fanned = scan_many(tmp_path, calib, cli={"limit": 120}, engine=EngineOptions("ray", workers=2))
    assert [m.path for m in fanned.models] == [m.path for m in serial.models]
    assert fanned.to_dict() == serial.to_dict()
