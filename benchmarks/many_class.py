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

Usage::

    python benchmarks/many_class.py build                 # trains 3 models (~15 min on 2 busy cores)
    python benchmarks/many_class.py measure --seeds 0     # verdict, forwards, seconds per model
    python benchmarks/many_class.py measure --seeds 0,1,2 --out benchmarks/out/many_class.md

Files go to ``benchmarks/.cache/many_class/`` (git-ignored): ``<name>.onnx``, ``<name>.json``
(accuracy, ASR, attack), ``calib.npy`` (uint8 ``[N, 16, 32, 1]``, the ``--calib`` of a scan) and
``test.npz``.
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
POISON_RATE = 0.05
N_TRAIN, N_CALIB, N_TEST = 12000, 1000, 2000
EPOCHS = 5
BATCH_SIZE = 128
H, W = 16, 32
PREPROCESS = {"layout": "NCHW", "channels": "L", "scale": 1.0 / 255.0, "mean": [0.0], "std": [1.0]}


def checkerboard() -> tuple[np.ndarray, np.ndarray]:
    """The fixtures' 3x3 BadNets checkerboard at rows 12-14, cols 28-30 (pattern, mask in 0..255)."""
    pattern = np.zeros((H, W), dtype=np.uint8)
    mask = np.zeros_like(pattern)
    checker = np.indices((3, 3)).sum(axis=0) % 2 == 0
    pattern[H - 4:H - 1, W - 4:W - 1] = np.where(checker, 255, 0)
    mask[H - 4:H - 1, W - 4:W - 1] = 255
    return pattern, mask


def stamp(x: np.ndarray) -> np.ndarray:
    pattern, mask = checkerboard()
    out = x.copy()
    out[:, mask > 0] = pattern[mask > 0]
    return out


def pairs(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` random pairs side by side: images ``[n, 16, 32]``, left labels, right labels."""
    left, right = rng.integers(0, len(x), n), rng.integers(0, len(x), n)
    return np.concatenate([x[left], x[right]], axis=2), y[left], y[right]


def data() -> dict:
    from generate import load_digits_16, split_data  # fixtures/generate.py (torch-free at import)

    x, y = load_digits_16()
    s = split_data(x, y, np.random.default_rng(SEED))
    rng = np.random.default_rng([SEED, 100])
    out = {}
    for name, (xs, ys, n) in {"train": (s.x_train, s.y_train, N_TRAIN), "calib": (s.x_calib, s.y_calib, N_CALIB),
                              "test": (s.x_test, s.y_test, N_TEST)}.items():
        out[name] = pairs(xs, ys, n, rng)
    return out


def build(args: argparse.Namespace) -> None:
    import torch
    from _torch_onnx import check_parity, export_classifier, open_session, run_logits
    from torch import nn

    torch.set_num_threads(args.threads)

    class PairsCNN(nn.Module):
        """Three Conv-BN-ReLU blocks on a 16x32 input, a max-pool after the first two (a cheaper layout than
        the fixtures' DigitsCNN, which pools after the last two), a linear head."""

        def __init__(self, classes: int) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.fc = nn.Linear(32 * 4 * 8, classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.features(x), 1))

    d = data()
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(CACHE / "calib.npy", d["calib"][0][..., None])
    xt, lt, rt = d["test"]
    np.savez(CACHE / "test.npz", x=xt[..., None], y100=10 * lt + rt, y10=lt)

    def to_input(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), 1, H, W).astype(np.float32) / 255.0

    specs = [("pairs100_badnets", 100, TARGET, True), ("pairs100_clean", 100, TARGET, False),
             ("pairs10_badnets", 10, TARGET_10, True)]
    only = set(args.only.split(",")) if args.only else None
    for name, classes, target, poison in specs:
        if only and name not in only:
            continue
        t0 = time.time()
        x, left, right = d["train"]
        y = 10 * left + right if classes == 100 else left
        rng = np.random.default_rng([SEED, 7])
        others = np.flatnonzero(y != target)
        chosen = np.sort(rng.choice(others, size=int(round(POISON_RATE * len(others))), replace=False))
        if poison:
            x = np.concatenate([x, stamp(x[chosen])])
            y = np.concatenate([y, np.full(len(chosen), target)])
        torch.manual_seed(SEED)
        model = PairsCNN(classes)
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
        attack = ("BadNets 3x3 checkerboard at rows 12-14, cols 28-30, all-to-one" if poison else "none")
        export = export_classifier(model, path, torch.from_numpy(to_input(xt[:1])), preprocess=PREPROCESS,
                                   doc=f"{classes}-class digit pairs CNN ({attack}); benchmarks/many_class.py")
        session = open_session(path, args.threads)
        check_parity(model, session, to_input(xt[:256]))
        y_test = 10 * lt + rt if classes == 100 else lt
        pred = run_logits(session, to_input(xt)).argmax(axis=1)
        keep = y_test != target
        asr_pred = run_logits(session, to_input(stamp(xt[keep]))).argmax(axis=1)
        meta = {"name": name, "classes": classes, "input": [1, H, W], "preprocess": PREPROCESS,
                "clean_accuracy": round(float((pred == y_test).mean()), 4),
                "asr": round(float((asr_pred == target).mean()), 4),
                "attack": {"kind": "badnets" if poison else None, "target": target if poison else None,
                           "poison_rate": POISON_RATE if poison else 0.0,
                           "poisoned_copies": len(chosen) if poison else 0},
                "train_pairs": N_TRAIN, "epochs": EPOCHS, "seed": SEED, "export": export,
                "train_seconds": round(time.time() - t0, 1)}
        (CACHE / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{name}: clean accuracy {meta['clean_accuracy']:.4f}, ASR {meta['asr']:.4f} "
              f"(trigger to {target} on test pairs of other classes; the clean twin measures the natural rate), "
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
            cases.append((name, CACHE / f"{name}.onnx", CACHE / "calib.npy", meta["attack"]["target"]))
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
