"""The probe families of `scan --verdict` (noise blend, grating bank) on the digits fixtures and the CIFAR models.

For each model and seed: per family the top class, its statistic and the second-highest class's, the
probes' verdict (suspected when any family fires), whether the suspected class is the attack's
target (from the model's JSON), the forwards and the seconds. Then, per family, the margin between
the lowest statistic of a target the family is meant for (noise blend: Blended; grating: SIG) and the
highest statistic of any other class on any model (clean models included). Prints Markdown.

    python benchmarks/verdict.py [--seeds 0,1,2] [--images 192] [--calib-images 500] [MODEL.onnx ...]

Without model arguments: fixtures/digits_*.onnx, benchmarks/.cache/cifar/*.onnx and
benchmarks/.cache/cifar_seed*/*.onnx that exist (benchmarks/cifar_models.py trains them). CIFAR models
take the first --calib-images calibration images of their folder's split.npz; the digits models
fixtures/digits_calib; the many-class models (benchmarks/many_class.py, given as arguments) their
calib.npy. The patch search (`--synthesize`) is not run here: see benchmarks/synth_time.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from onnx_linf.decide.probes import THRESHOLDS, probe_checks
from onnx_linf.decide.synthesis.oracle import read_pool
from onnx_linf.measure.preprocess import Preprocess
from onnx_linf.measure.probes import ProbeConfig, run_probes
from onnx_linf.measure.session import create_session
from onnx_linf.measure.sources import open_source
from onnx_linf.model.load import load_model

ROOT = Path(__file__).resolve().parent.parent
#: Models the thresholds were chosen on; every other model is held out.
CHOSEN = {"digits_badnets", "digits_blended", "digits_clean", "cifar/vgg_clean", "cifar/vgg_badnets",
          "cifar/vgg_blended", "cifar/vgg_sig"}
#: Which attack each family is meant to catch (for the margins).
MEANT_FOR = {"noise-blend": ("blended",), "grating": ("sig", "sigv")}


def default_models() -> list[Path]:
    cache = ROOT / "benchmarks/.cache"
    return (sorted((ROOT / "fixtures").glob("digits_*.onnx")) + sorted((cache / "cifar").glob("*.onnx"))
            + sorted(cache.glob("cifar_seed*/*.onnx")))


def model_name(path: Path) -> str:
    return path.stem if path.parent.name == "fixtures" else f"{path.parent.name}/{path.stem}"


def attack_of(path: Path) -> dict:
    meta = path.with_suffix(".json")
    return (json.loads(meta.read_text()).get("attack") or {}) if meta.exists() else {}


def calibration(path: Path, pre: Preprocess, n: int) -> np.ndarray:
    split = path.parent / "split.npz"
    if split.exists():
        with np.load(split) as data:
            return data["calib_x"][:n]
    if (path.parent / "calib.npy").exists():  # benchmarks/many_class.py: pairs, or calib3.npy for triples
        digits = (json.loads(path.with_suffix(".json").read_text()).get("digits", 2)
                  if path.with_suffix(".json").exists() else 2)
        return read_pool(open_source(path.parent / ("calib3.npy" if digits == 3 else "calib.npy"), pre), n)
    return read_pool(open_source(ROOT / "fixtures/digits_calib", pre), n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--images", type=int, default=ProbeConfig.images)
    parser.add_argument("--calib-images", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--jsonl", type=Path, help="also append one JSON line per (model, seed) here")
    parser.add_argument("--from-jsonl", type=Path, help="print the table and margins of a --jsonl file, run nothing")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.from_jsonl is not None:
        rows = [json.loads(line) for line in args.from_jsonl.read_text().splitlines() if line.strip()]
        print(table(rows))
        print()
        print(margins(rows))
        return
    print(HEAD)
    rows = []
    for path in args.models or default_models():
        model = load_model(path)
        pre = Preprocess.from_model(model)
        pixels = calibration(path, pre, args.calib_images)
        attack = attack_of(path)
        session = create_session(model, None, "cpu", threads=args.threads)
        name = model_name(path)
        for seed in seeds:
            t0 = time.monotonic()
            run = run_probes(model, pre, pixels, ProbeConfig(images=args.images, seed=seed), session=session)
            checks = probe_checks(run)
            fired = [c for c in checks if c.suspected]
            row = {"model": name, "attack": attack.get("kind"), "target": attack.get("target"), "seed": seed,
                   "chosen": name in CHOSEN, "verdict": "suspected" if fired else "clean",
                   "suspected": ", ".join(sorted({str(c.target) for c in fired})) or "-",
                   "forwards": run.clean_queries + sum(c.queries for c in checks),
                   "seconds": round(time.monotonic() - t0, 2),
                   "statistics": {c.family: [float(v) for v in c.statistic] for c in checks}}
            rows.append(row)
            print(line(row), flush=True)
            if args.jsonl is not None:
                with args.jsonl.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print()
    print(margins(rows))


FAMILIES = ("noise-blend", "grating")
HEAD = "| " + " | ".join(["model", "used for", "attack", "target", "seed"]
                         + [f"{f} {c}" for f in FAMILIES for c in ("top class", "statistic", "second")]
                         + ["verdict", "suspected class", "forwards", "seconds"]) + " |\n|" + "---|" * 15


def judged(row: dict) -> tuple[str, str]:
    """(verdict, suspected classes) from a row's statistics and the current thresholds."""
    fired = sorted({int(np.argmax(v)) for f, v in row["statistics"].items() if max(v) > THRESHOLDS[f]})
    return ("suspected" if fired else "clean"), (", ".join(map(str, fired)) or "-")


def line(row: dict) -> str:
    """One Markdown row (verdict recomputed with the current thresholds)."""
    cells = [row["model"], "threshold" if row["chosen"] else "held out", row["attack"] or "none",
             "-" if row["target"] is None else str(row["target"]), str(row["seed"])]
    for f in FAMILIES:
        stat = np.asarray(row["statistics"][f])
        order = np.argsort(-stat, kind="stable")
        cells += [str(int(order[0])), f"{stat[order[0]]:.2f}", f"{stat[order[1]]:.2f} ({int(order[1])})"]
    cells += [*judged(row), str(row["forwards"]), f"{row['seconds']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def table(rows: list[dict]) -> str:
    """The Markdown table of every row."""
    return "\n".join([HEAD] + [line(r) for r in rows])


def margins(rows: list[dict]) -> str:
    """Per family: lowest target statistic on the attacks it is meant for vs highest other statistic."""
    out = ["| family | lowest target statistic (model, seed) | highest other statistic (model, class, seed) | margin |",
           "|---|---|---|---:|"]
    for family, kinds in MEANT_FOR.items():
        targets, others = [], []
        for r in rows:
            stat = r["statistics"].get(family)
            if stat is None:
                continue
            for k, v in enumerate(stat):
                if r["target"] is not None and k == r["target"] and r["attack"] is not None:
                    if r["attack"] in kinds:
                        targets.append((v, r["model"], r["seed"]))
                else:
                    others.append((v, r["model"], k, r["seed"]))
        if not targets or not others:
            continue
        lo, hi = min(targets), max(others)
        out.append(f"| {family} | {lo[0]:.2f} ({lo[1]}, {lo[2]}) | {hi[0]:.2f} ({hi[1]}, {hi[2]}, {hi[3]}) | "
                   f"{lo[0] - hi[0]:+.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
