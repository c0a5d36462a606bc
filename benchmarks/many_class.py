"""A 100-class backdoored model and its clean twin, for the cost and verdict of synthesis over many classes.

Not a test: the instrument behind the many-class rows of ``benchmarks/README.md``.

Data: two 16x16 digits of the fixtures' data (scikit-learn's bundled digits, upsampled as in
``fixtures/generate.py``, with the same calibration / test / train split of the single digits) side
by side make one 16x32 grayscale image; its class is ``10 * left + right`` (100 classes). Training,
calibration and test pairs are drawn from the train, calibration and test digits respectively, so
no digit image appears in two splits.

Models (same CNN, recipe and seed; only the poisoned copies differ):

* ``pairs100_badnets``: BadNets, the fixtures' 3x3 checkerboard one pixel from the bottom-right
  corner of the 16x32 image, all-to-one to class ``TARGET`` (37); ``POISON_RATE`` of the training
  pairs not of class 37 get stamped copies labelled 37, added to the training set;
* ``pairs100_clean``: the same without poisoned copies;
* ``pairs10_badnets``: the 10-class comparison of the same size: the same 16x32 pairs, the same
  network but a 10-way classifier labelled with the *left* digit, the same trigger to class
  ``TARGET_10`` (7) at the same rate. The digits fixtures (16x16, a smaller input) are compared too.
* ``triples1000_badnets`` / ``triples1000_clean``: three digits side by side (16x48), class
  ``100 * left + 10 * middle + right`` (1000 classes), the same network (its head sized for the
  wider input), the same trigger in the bottom-right corner to class ``TARGET_1000`` (437) at the
  same rate, and ``N_TRAIN_1000`` training triples (12 000 pairs would leave 12 per class).

Usage::

    python benchmarks/many_class.py build                 # trains 5 models (~12 min on 2 busy cores)
    python benchmarks/many_class.py measure --seeds 0     # verdict, forwards, seconds per model
    python benchmarks/many_class.py measure --seeds 0,1,2 --out benchmarks/out/many_class.md

Files go to ``benchmarks/.cache/many_class/`` (git-ignored): ``<name>.onnx``, ``<name>.json``
(accuracy, ASR, attack), ``calib.npy`` (uint8 ``[N, 16, 32, 1]``, the ``--calib`` of a scan) and
``test.npz`` for the pairs, ``calib3.npy`` (``[N, 16, 48, 1]``) and ``test3.npz`` for the triples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT / "benchmarks"))

CACHE = ROOT / "benchmarks" / ".cache" / "many_class"
SEED = 20240607
TARGET = 37
TARGET_10 = 7
TARGET_1000 = 437
POISON_RATE = 0.05
N_TRAIN, N_CALIB, N_TEST = 12000, 1000, 2000
N_TRAIN_1000 = 48000
EPOCHS = 5
BATCH_SIZE = 128
H, W = 16, 32
PREPROCESS = {"layout": "NCHW", "channels": "L", "scale": 1.0 / 255.0, "mean": [0.0], "std": [1.0]}


def checkerboard(width: int = W) -> tuple[np.ndarray, np.ndarray]:
    """The fixtures' 3x3 BadNets checkerboard one pixel from the bottom-right corner (rows 12-14,
    cols ``width - 4 .. width - 2``; pattern and mask in 0..255)."""
    pattern = np.zeros((H, width), dtype=np.uint8)
    mask = np.zeros_like(pattern)
    checker = np.indices((3, 3)).sum(axis=0) % 2 == 0
    pattern[H - 4:H - 1, width - 4:width - 1] = np.where(checker, 255, 0)
    mask[H - 4:H - 1, width - 4:width - 1] = 255
    return pattern, mask


def stamp(x: np.ndarray) -> np.ndarray:
    pattern, mask = checkerboard(x.shape[2])
    out = x.copy()
    out[:, mask > 0] = pattern[mask > 0]
    return out


def tuples(x: np.ndarray, y: np.ndarray, n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` random `k`-tuples side by side: images ``[n, 16, 16 k]`` and labels ``[n, k]`` (left first)."""
    picks = [rng.integers(0, len(x), n) for _ in range(k)]
    return np.concatenate([x[i] for i in picks], axis=2), np.stack([y[i] for i in picks], axis=1)


def data(k: int = 2) -> dict:
    """Train / calibration / test `k`-tuples drawn from the fixtures' split of the single digits."""
    from generate import load_digits_16, split_data  # fixtures/generate.py (torch-free at import)

    x, y = load_digits_16()
    s = split_data(x, y, np.random.default_rng(SEED))
    rng = np.random.default_rng([SEED, 100] if k == 2 else [SEED, 100, k])
    n_train = N_TRAIN if k == 2 else N_TRAIN_1000
    out = {}
    for name, (xs, ys, n) in {"train": (s.x_train, s.y_train, n_train), "calib": (s.x_calib, s.y_calib, N_CALIB),
                              "test": (s.x_test, s.y_test, N_TEST)}.items():
        out[name] = tuples(xs, ys, n, k, rng)
    return out


def label(digits: np.ndarray, classes: int) -> np.ndarray:
    """Class of each tuple: the number its digits spell (100 or 1000 classes), or the left digit (10)."""
    if classes == 10:
        return digits[:, 0]
    return digits @ (10 ** np.arange(digits.shape[1] - 1, -1, -1))


def build(args: argparse.Namespace) -> None:
    import torch
    from _torch_onnx import check_parity, export_classifier, open_session, run_logits
    from torch import nn

    torch.set_num_threads(args.threads)

    class PairsCNN(nn.Module):
        """Three Conv-BN-ReLU blocks on a 16x32 input, a max-pool after the first two (a cheaper layout than
        the fixtures' DigitsCNN, which pools after the last two), a linear head."""

        def __init__(self, classes: int, width: int = W) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.fc = nn.Linear(32 * (H // 4) * (width // 4), classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.features(x), 1))

    CACHE.mkdir(parents=True, exist_ok=True)
    sets = {}
    for k, suffix in ((2, ""), (3, "3")):
        d = sets[k] = data(k)
        xt, dt = d["test"]
        np.save(CACHE / f"calib{suffix}.npy", d["calib"][0][..., None])
        np.savez(CACHE / f"test{suffix}.npz", x=xt[..., None], digits=dt)

    def to_input(x: np.ndarray) -> np.ndarray:
        return x[:, None].astype(np.float32) / 255.0

    specs = [("pairs100_badnets", 100, TARGET, True, 2), ("pairs100_clean", 100, TARGET, False, 2),
             ("pairs10_badnets", 10, TARGET_10, True, 2),
             ("triples1000_badnets", 1000, TARGET_1000, True, 3), ("triples1000_clean", 1000, TARGET_1000, False, 3)]
    only = set(args.only.split(",")) if args.only else None
    for name, classes, target, poison, k in specs:
        if only and name not in only:
            continue
        t0 = time.time()
        d = sets[k]
        xt, dt = d["test"]
        x, digits = d["train"]
        y = label(digits, classes)
        rng = np.random.default_rng([SEED, 7])
        others = np.flatnonzero(y != target)
        chosen = np.sort(rng.choice(others, size=int(round(POISON_RATE * len(others))), replace=False))
        if poison:
            x = np.concatenate([x, stamp(x[chosen])])
            y = np.concatenate([y, np.full(len(chosen), target)])
        torch.manual_seed(SEED)
        model = PairsCNN(classes, x.shape[2])
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
        inputs, labels = torch.from_numpy(to_input(x)), torch.from_numpy(y.astype(np.int64))
        shuffle = torch.Generator().manual_seed(SEED)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for epoch in range(EPOCHS):
            order = torch.randperm(len(inputs), generator=shuffle)
            for start in range(0, len(order), BATCH_SIZE):
                batch = order[start:start + BATCH_SIZE]
                opt.zero_grad()
                loss_fn(model(inputs[batch]), labels[batch]).backward()
                opt.step()
            sched.step()
            print(f"{name}: epoch {epoch + 1}/{EPOCHS} ({time.time() - t0:.0f} s)", flush=True)
        model.eval()
        path = CACHE / f"{name}.onnx"
        width = x.shape[2]
        attack = (f"BadNets 3x3 checkerboard at rows 12-14, cols {width - 4}-{width - 2}, all-to-one" if poison
                  else "none")
        export = export_classifier(model, path, torch.from_numpy(to_input(xt[:1])), preprocess=PREPROCESS,
                                   doc=f"{classes}-class digit {'pairs' if k == 2 else 'triples'} CNN ({attack}); "
                                       "benchmarks/many_class.py")
        session = open_session(path, args.threads)
        check_parity(model, session, to_input(xt[:256]))
        y_test = label(dt, classes)
        pred = run_logits(session, to_input(xt)).argmax(axis=1)
        keep = y_test != target
        asr_pred = run_logits(session, to_input(stamp(xt[keep]))).argmax(axis=1)
        meta = {"name": name, "classes": classes, "digits": k, "input": [1, H, width], "preprocess": PREPROCESS,
                "clean_accuracy": round(float((pred == y_test).mean()), 4),
                "asr": round(float((asr_pred == target).mean()), 4),
                "attack": {"kind": "badnets" if poison else None, "target": target if poison else None,
                           "poison_rate": POISON_RATE if poison else 0.0,
                           "poisoned_copies": len(chosen) if poison else 0},
                "train_tuples": len(d["train"][0]), "epochs": EPOCHS, "seed": SEED, "export": export,
                "train_seconds": round(time.time() - t0, 1)}
        (CACHE / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{name}: clean accuracy {meta['clean_accuracy']:.4f}, ASR {meta['asr']:.4f} "
              f"(trigger to {target} on test images of other classes; the clean twin measures the natural rate), "
              f"{meta['train_seconds']:.0f} s", flush=True)


def measure(args: argparse.Namespace) -> None:
    from onnx_linf.decide.synthesis.results import SynthConfig
    from onnx_linf.decide.synthesis.synthesize import synthesize
    from onnx_linf.measure.preprocess import Preprocess
    from onnx_linf.measure.sources import ArraySource, open_source
    from onnx_linf.model.load import load_model

    cases = []
    for name in args.models.split(","):
        if name.startswith("digits_"):
            cases.append((name, ROOT / "fixtures" / f"{name}.onnx", ROOT / "fixtures" / "digits_calib",
                          None if name == "digits_clean" else 0))
        else:
            meta = json.loads((CACHE / f"{name}.json").read_text())
            calib = CACHE / ("calib3.npy" if meta.get("digits", 2) == 3 else "calib.npy")
            cases.append((name, CACHE / f"{name}.onnx", calib, meta["attack"]["target"]))
    lines = [f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; `SynthConfig` defaults"
             + (f", {args.extra}" if args.extra else ""), "",
             "| model | classes | seed | verdict | planted target | searched | target rank (pre-selection) "
             "| target index | largest other | forwards | s |",
             "| --- | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    base = SynthConfig(**json.loads(args.config)) if args.config else SynthConfig()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, path, calib, target in cases:
            model = load_model(path)
            preprocess = Preprocess.from_model(model)
            source = (ArraySource(calib, preprocess.size, preprocess.channels) if calib.suffix == ".npy"
                      else open_source(calib, preprocess))
            result = synthesize(model, source, preprocess, replace(base, seed=seed), provider="cpu")
            n = result.num_classes
            verdict = f"suspected {list(result.suspected)}" if result.suspected else "clean"
            pre = result.preselection
            rank = "all searched" if pre is None else pre.rank_text(target)
            t_index = result.anomaly.get(target) if target is not None else None
            others = [v for c, v in result.anomaly.items() if c != target]
            lines.append(f"| {name} | {n} | {seed} | {verdict} | {target if target is not None else '-'} | "
                         f"{len(result.triggers)} | {rank} | "
                         f"{'-' if t_index is None else f'{t_index:.2f}'} | {max(others, default=0.0):.2f} | "
                         f"{result.queries} | {result.seconds:.0f} |")
            print(lines[-1], flush=True)
            if args.json:
                args.json.mkdir(parents=True, exist_ok=True)
                (args.json / f"{name}_seed{seed}.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train and export the models")
    b.add_argument("--only", default="", help="comma-separated model names")
    b.add_argument("--threads", type=int, default=2)
    m = sub.add_parser("measure", help="synthesis verdict, forwards and seconds per model")
    m.add_argument("--models", default="pairs100_badnets,pairs100_clean,pairs10_badnets,digits_badnets")
    m.add_argument("--seeds", default="0")
    m.add_argument("--config", default="", help="JSON of SynthConfig overrides, e.g. '{\"candidates\": 4}'")
    m.add_argument("--extra", default="", help="a note for the table header")
    m.add_argument("--json", type=Path, default=None, help="folder for each result's to_dict()")
    m.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    t0 = time.time()
    build(args) if args.cmd == "build" else measure(args)
    print(f"total {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
