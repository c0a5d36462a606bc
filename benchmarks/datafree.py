"""Data-free scan (`onnx-linf scan MODEL` without --calib) on the digits fixtures and the CIFAR models.

For each model: the CLP statistic, the margin ratio (and its top class), the verdict, whether the
suspected target is the attack's target (from the model's JSON), and the cost. Prints a Markdown table.

    python benchmarks/datafree.py [--seeds 0,1,2] [--max-queries 20000] [MODEL.onnx ...]

Without model arguments: fixtures/digits_*.onnx and every benchmarks/.cache/cifar/*.onnx that exists
(benchmarks/cifar_models.py trains them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from onnx_linf.commands.datafree import datafree_checks
from onnx_linf.measure.margin import MarginConfig
from onnx_linf.measure.preprocess import Preprocess
from onnx_linf.model.load import load_model
from onnx_linf.model.taps import find_taps

ROOT = Path(__file__).resolve().parent.parent


def default_models() -> list[Path]:
    return sorted((ROOT / "fixtures").glob("digits_*.onnx")) + sorted((ROOT / "benchmarks/.cache/cifar").glob("*.onnx"))


def attack_target(path: Path) -> int | None:
    meta = path.with_suffix(".json")
    if not meta.exists():
        return None
    attack = json.loads(meta.read_text()).get("attack")
    return None if not attack else attack.get("target")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--max-queries", type=int, default=MarginConfig.max_queries)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| model | attack target | seed | CLP z | margin ratio | top class | verdict | right target | "
          "forwards | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.models or default_models():
        model = load_model(path)
        taps = find_taps(model, "all")
        pre = Preprocess.from_model(model)
        target = attack_target(path)
        for seed in seeds:
            t0 = time.monotonic()
            verdict, _ = datafree_checks(model, taps, pre, "cpu",
                                         MarginConfig(max_queries=args.max_queries, seed=seed))
            clp, margin = verdict.checks
            right = "" if target is None or verdict.verdict != "suspected" else \
                ("yes" if verdict.target == target else "no" if verdict.target is not None else "no class")
            print(f"| {path.stem} | {'-' if target is None else target} | {seed} | {clp.statistic:.2f} | "
                  f"{margin.statistic:.2f} | {margin.top_class} | {verdict.verdict} | {right} | {margin.queries} | "
                  f"{time.monotonic() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
