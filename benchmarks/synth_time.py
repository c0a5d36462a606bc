"""Time and outcome of query-only trigger synthesis (`onnx_linf.synthesize`).

Not a test: the instrument behind the synthesis numbers in the README. For each model it runs
`synthesize` over every class and reports, per class, the mask ℓ1 norm, the validated attack success
rate, where the search started (patch scan or uniform mask), the ℓ∞ top-channel share, the anomaly
index, and the verdict, with wall-clock time and query count. Where the real trigger is known it
also reports how much of the synthetic mask falls inside the real trigger's mask.

Models:

* the digits fixtures (``fixtures/digits_{badnets,blended,clean}.onnx``, calibration PNGs in
  ``fixtures/digits_calib``);
* with ``--cifar DIR``: CIFAR-10 models from ``benchmarks/cifar_models.py`` (``<name>.onnx`` with
  ``<name>.json`` metadata and ``split.npz`` holding ``calib_x``), e.g. ``vgg_badnets``, ``vgg_clean``.

Usage::

    python benchmarks/synth_time.py                                  # digits fixtures (~3 min, 2 cores)
    python benchmarks/synth_time.py --seeds 0,1,2                    # verdict stability over seeds
    python benchmarks/synth_time.py --cifar benchmarks/.cache/cifar --only vgg_badnets,vgg_clean \\
        --cifar-time-limit 600
    python benchmarks/synth_time.py --out benchmarks/out/synth.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnx_linf.decide.synthesis.results import SynthConfig, SynthResult  # noqa: E402
from onnx_linf.decide.synthesis.synthesize import synthesize  # noqa: E402
from onnx_linf.measure.preprocess import Preprocess  # noqa: E402
from onnx_linf.measure.sources import ArraySource, open_source  # noqa: E402
from onnx_linf.model.load import load_model  # noqa: E402

FIXTURES = ROOT / "fixtures"


def _real_mask(path: Path | None) -> np.ndarray | None:
    if path is None or not path.is_file():
        return None
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0


def overlap(synthetic: np.ndarray, real: np.ndarray) -> tuple[float, float]:
    """(share of the synthetic mask's ℓ1 on the real mask's support, IoU of the synthetic mask above
    0.5 with that support). A blended trigger's support is the whole image."""
    inside = float((synthetic * (real > 0)).sum() / max(synthetic.sum(), 1e-12))
    a, b = synthetic > 0.5, real > 0
    iou = float((a & b).sum() / max((a | b).sum(), 1))
    return inside, iou


def moved_trigger_asr(model, preprocess: Preprocess, images: np.ndarray, trigger_png: Path, real: np.ndarray,
                      synthetic: np.ndarray, target: int) -> float | None:
    """ASR of the *real* trigger pasted where the synthetic mask is (top-left corners aligned).

    Tells a wrong synthetic trigger from a right one found elsewhere: models with global pooling and
    crop augmentation often answer a patch trigger wherever it is.
    """
    from onnx_linf.measure.session import create_session

    rows, cols = np.nonzero(synthetic > 0.5)
    rr, rc = np.nonzero(real > 0.5)
    if not rows.size or not rr.size:
        return None
    mode = "L" if preprocess.channels == "L" else "RGB"
    pattern = np.asarray(Image.open(trigger_png).convert(mode), dtype=np.float32)
    pattern = pattern[..., None] if pattern.ndim == 2 else pattern
    h, w = rr.max() - rr.min() + 1, rc.max() - rc.min() + 1
    r0, c0 = min(rows.min(), images.shape[1] - h), min(cols.min(), images.shape[2] - w)
    session = create_session(model, None, "cpu")
    clean = session.run(None, preprocess.apply(images))[0].argmax(axis=1)
    x = images[clean != target].copy()
    x[:, r0:r0 + h, c0:c0 + w] = np.where(real[rr.min():rr.max() + 1, rc.min():rc.max() + 1, None] > 0.5,
                                          pattern[rr.min():rr.max() + 1, rc.min():rc.max() + 1],
                                          x[:, r0:r0 + h, c0:c0 + w])
    pred = session.run(None, preprocess.apply(x))[0].argmax(axis=1)
    return float((pred == target).mean())


def table(name: str, result: SynthResult, target: int | None, real: np.ndarray | None,
          moved: float | None = None) -> list[str]:
    """Markdown lines for one model."""
    lines = [f"### {name}", "",
             f"{len(result.triggers)} classes, {result.queries} queries, {result.seconds:.1f} s "
             f"({result.seconds / max(len(result.triggers), 1):.1f} s/class); suspected: "
             f"{list(result.suspected) or 'none'}" + ("" if result.complete else " (INCOMPLETE: budget/time)"), "",
             "| class | mask L1 | ASR | start | ℓ∞ top-10% share | anomaly index | queries | s |",
             "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for t in result.triggers:
        mark = " **suspected**" if t.target in result.suspected else ""
        mark += " (target)" if t.target == target else ""
        share = "" if t.concentration is None else f"{t.concentration:.2f}"
        found = "" if t.found else " (not found)"
        lines.append(f"| {t.target}{mark} | {t.mask_l1:.1f}{found} | {t.asr:.2f} | {t.start} | {share} | "
                     f"{result.anomaly[t.target]:.2f} | {t.queries} | {t.seconds:.1f} |")
    if target is not None and real is not None and any(t.target == target for t in result.triggers):
        mask = result.trigger(target).mask
        inside, iou = overlap(mask, real)
        def where(m: np.ndarray) -> str:
            rows, cols = np.nonzero(m)
            return f"rows {rows.min()}-{rows.max()}, cols {cols.min()}-{cols.max()}" if rows.size else "empty"

        lines += ["", f"Synthetic mask of the target class {target} (pixels > 0.5 at {where(mask > 0.5)}) vs "
                      f"the real trigger mask ({where(real > 0)}): {inside:.0%} of its ℓ1 on the real mask, "
                      f"IoU {iou:.2f}."]
        if moved is not None:
            lines += [f"The real trigger pasted at the synthetic mask's top-left corner: ASR {moved:.2f}."]
    return lines + [""]


def digits(seeds: list[int], config: SynthConfig) -> list[str]:
    lines = ["## Digits fixtures (16x16 grayscale, 10 classes, target 0)", ""]
    summary = ["| seed | model | verdict | target anomaly | largest other | mask L1 target / median | time |",
               "| ---: | --- | --- | ---: | ---: | --- | ---: |"]
    for seed in seeds:
        for kind in ("badnets", "blended", "clean"):
            model = load_model(FIXTURES / f"digits_{kind}.onnx")
            preprocess = Preprocess.from_model(model)
            source = open_source(FIXTURES / "digits_calib", preprocess)
            result = synthesize(model, source, preprocess, replace(config, seed=seed), provider="cpu")
            target = None if kind == "clean" else 0
            real = _real_mask(FIXTURES / f"digits_{kind}_mask.png") if target is not None else None
            moved = None
            if kind == "badnets":
                images = np.concatenate([b.pixels for b in source.batches(512)])
                moved = moved_trigger_asr(model, preprocess, images, FIXTURES / "digits_badnets_trigger.png", real,
                                          result.trigger(0).mask, 0)
            lines += table(f"digits_{kind} (seed {seed})", result, target, real, moved)
            norms = np.array([t.norm for t in result.triggers])
            others = [result.anomaly[c] for c in result.anomaly if c != 0]
            verdict = f"suspected {list(result.suspected)}" if result.suspected else "clean"
            summary.append(f"| {seed} | {kind} | {verdict} | {result.anomaly.get(0, float('nan')):.2f} | "
                           f"{max(others):.2f} | {result.trigger(0).norm:.1f} / {np.median(norms):.1f} | "
                           f"{result.seconds:.0f} s |")
            print("\n".join(summary[-1:]), flush=True)
    return lines + ["### Summary", ""] + summary + [""]


def cifar(folder: Path, names: list[str], config: SynthConfig, images: int) -> list[str]:
    lines = ["## CIFAR-10 models", ""]
    split = np.load(folder / "split.npz")
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npy"
        np.save(calib, split["calib_x"][:images])
        for name in names:
            meta = json.loads((folder / f"{name}.json").read_text())
            model = load_model(folder / f"{name}.onnx")
            pp = meta["preprocess"]
            preprocess = Preprocess.from_model(model, layout=pp["layout"], channels=pp["channels"],
                                               scale=pp["scale"], mean=pp["mean"], std=pp["std"])
            source = ArraySource(calib, preprocess.size, preprocess.channels)
            result = synthesize(model, source, preprocess, config, provider="cpu")
            attack = meta.get("attack") or {}
            target = attack.get("target")
            real = _real_mask(folder / attack["mask"]) if attack.get("mask") else None
            moved = None
            if real is not None and attack.get("kind") == "badnets" and target in result.anomaly:
                moved = moved_trigger_asr(model, preprocess, split["calib_x"][:images], folder / attack["trigger"],
                                          real, result.trigger(target).mask, target)
            lines += table(name, result, target, real, moved)
            print("\n".join(lines[-14:]), flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds for the digits runs")
    parser.add_argument("--no-digits", action="store_true")
    parser.add_argument("--cifar", type=Path, default=None, help="folder of CIFAR-10 models (cifar_models.py)")
    parser.add_argument("--only", default="vgg_badnets,vgg_clean", help="CIFAR model names")
    parser.add_argument("--cifar-images", type=int, default=512, help="CIFAR calibration images")
    parser.add_argument("--cifar-time-limit", type=float, default=None, help="seconds per CIFAR model")
    parser.add_argument("--steps", type=int, default=SynthConfig.steps)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here too")
    args = parser.parse_args()

    config = SynthConfig(steps=args.steps)
    lines = ["# Query-only trigger synthesis", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
             f"{platform.python_version()}; defaults of `SynthConfig` unless noted (steps {args.steps}).", ""]
    if not args.no_digits:
        lines += digits([int(s) for s in args.seeds.split(",")], config)
    if args.cifar is not None:
        cifar_config = replace(config, time_limit=args.cifar_time_limit)
        lines += cifar(args.cifar, [n for n in args.only.split(",") if n], cifar_config, args.cifar_images)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.0f} s", file=sys.stderr)
