"""Scan throughput on Ray (1 and 2 workers) against the local engine, per-task overhead, merge cost.

Not a test: the instrument behind the "Ray engine" section of ``benchmarks/README.md``.

One process, one local Ray (``ray.init(num_cpus=2)`` unless ``--address``). Each round measures
the same folder of JPEG files (decoding included everywhere) with

* ``local``: `LocalEngine` (the default path, ORT with its default threads);
* ``ray-1``: `RayEngine`, 1 worker (1 CPU, ORT pinned to 1 thread), 2 shards;
* ``ray-2``: `RayEngine`, 2 workers (1 CPU each), 4 shards;

in an order that rotates every round, after one warm-up round. Ratios to ``local`` are taken per
round (adjacent runs share the machine's load) and reported as medians with min-max.

Then:

* fixed cost of a Ray pass: a pass over 8 images (1 shard) against the local pass over them;
* cost per shard: the same images with 2 workers in 4 and in `--many-shards` shards, the slope
  (actor calls, pickled partial results, driver-side merge);
* merge cost: `merge_stats` of two partial results, for the scan's statistics (``linf``, ``l1``:
  O(maps x channels)) and the clamp's (``pos_top``: O(maps x channels x positions)).

Usage::

    python benchmarks/ray_scale.py                            # cifar_cnn, 2048 JPEGs, 5 rounds
    python benchmarks/ray_scale.py --model resnet18 --images 128 --rounds 3
    python benchmarks/ray_scale.py --out benchmarks/out/ray_scale.md
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx
import ray

from onnx_linf.measure.engine import EngineOptions, LocalEngine, merge_stats
from onnx_linf.measure.instrument import DEFAULT_STATS
from onnx_linf.measure.preprocess import Preprocess
from onnx_linf.measure.probe import Probe
from onnx_linf.measure.ray_engine import RayEngine
from onnx_linf.measure.sources import ImageFolder
from onnx_linf.model.load import load_model
from onnx_linf.model.taps import find_taps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import MODELS, cpu_pressure, machine, write_jpegs  # noqa: E402

MERGE_REPS = 20


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def med(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar_cnn", choices=sorted(MODELS))
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--many-shards", type=int, default=64)
    ap.add_argument("--address", default=None, help="an existing Ray cluster (default: a local Ray, 2 CPUs)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    spec = MODELS[args.model]
    work = Path(tempfile.mkdtemp(prefix="ray_scale_"))
    path = work / f"{args.model}.onnx"
    onnx.save(spec.build(), path)
    folder = write_jpegs(work / "jpegs", args.images, spec.side)
    model = load_model(path)
    taps = find_taps(model, "all")
    pre = Preprocess(size=(spec.side, spec.side))
    source = ImageFolder(folder, pre.size)

    if args.address:
        ray.init(address=args.address, logging_level=logging.ERROR)
    else:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)

    def probe(engine):
        return Probe(model, taps, DEFAULT_STATS, "cpu", engine=engine)

    variants = {
        "local": probe(LocalEngine()),
        "ray-1": probe(RayEngine(EngineOptions("ray", workers=1, shards=2))),
        "ray-2": probe(RayEngine(EngineOptions("ray", workers=2, shards=4))),
    }
    for p in variants.values():  # warm-up: ORT arenas, Ray worker processes, imports in workers
        p.measure(source, pre, args.batch)
    times: dict[str, list[float]] = {k: [] for k in variants}
    ratios: dict[str, list[float]] = {k: [] for k in variants if k != "local"}
    names = list(variants)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        got = {k: timed(lambda k=k: variants[k].measure(source, pre, args.batch)) for k in order}
        for k, t in got.items():
            times[k].append(t)
        for k in ratios:
            ratios[k].append(got["local"] / got[k])
        print(f"round {r + 1}: " + ", ".join(f"{k} {args.images / got[k]:.0f} img/s" for k in names), flush=True)

    # Fixed cost of a pass: 8 images in one shard on Ray, against the same 8 images here.
    small = source.shard(0, 8)
    one = probe(RayEngine(EngineOptions("ray", workers=1, shards=1)))
    fixed_ray = [timed(lambda: one.measure(small, pre, args.batch)) for _ in range(3)]
    fixed_local = [timed(lambda: variants["local"].measure(small, pre, args.batch)) for _ in range(3)]
    # Cost per shard: the same images in 4 and in many shards, 2 workers.
    few = probe(RayEngine(EngineOptions("ray", workers=2, shards=4)))
    many = probe(RayEngine(EngineOptions("ray", workers=2, shards=args.many_shards)))
    per_shard = []
    for _ in range(3):
        t_few, t_many = timed(lambda: few.measure(source, pre, args.batch)), timed(
            lambda: many.measure(source, pre, args.batch))
        per_shard.append((t_many - t_few) / (args.many_shards - 4) * 1e3)

    # Merge cost of two shards' partial results: scan statistics and clamp (per-position top-1).
    half_a, half_b = source.shard(0, args.images // 2), source.shard(args.images // 2, args.images)
    merge_rows = []
    for label, stats in (("scan (linf, l1)", DEFAULT_STATS), ("clamp (pos_top, k=1)", ("pos_top",))):
        p = Probe(model, taps, stats, "cpu")
        a, b = p.measure(half_a, pre, args.batch), p.measure(half_b, pre, args.batch)
        elements = sum(v.size for st in a.values() for v in
                       [*(m.mean for m in st.moments.values()), *(t.values for t in st.top.values())])
        t = timed(lambda a=a, b=b: [merge_stats(a, b) for _ in range(MERGE_REPS)]) / MERGE_REPS
        merge_rows.append((label, elements, t * 1e3))

    lines = [
        f"Model `{args.model}` ({len(taps)} maps), {args.images} JPEG files {spec.side}x{spec.side}, batch "
        f"{args.batch}, statistics {', '.join(DEFAULT_STATS)}; {args.rounds} rounds after a warm-up.",
        "",
        f"Machine: {machine()}; {cpu_pressure()}; Ray {ray.__version__}, local Ray with 2 CPUs.",
        "",
        "| engine | images/s, median (min-max) | throughput vs local, per round |",
        "|---|---:|---:|",
    ]
    for k in names:
        ips = [args.images / t for t in times[k]]
        lines.append(f"| {k} | {med(ips, '{:.0f}')} | {'1' if k == 'local' else med(ratios[k])} |")
    lines += [
        "",
        f"* fixed cost of a Ray pass (actor start, session build, pipeline): {med(fixed_ray)} s for 8 images, "
        f"against {med(fixed_local, '{:.3f}')} s locally",
        f"* cost per shard (slope between 4 and {args.many_shards} shards, 2 workers): {med(per_shard, '{:.1f}')} ms",
    ]
    for label, elements, ms in merge_rows:
        lines.append(f"* merge of two partial results, {label}: {elements:,} values, {ms:.2f} ms "
                     f"({ms * 1e6 / max(1, elements):.1f} ns per value)")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
