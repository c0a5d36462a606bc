"""What the score gate and the fold cost a deployment: plain inference of the original model, the
default clamp (fold, gate on), the same with ``--excess clip``, with ``--gate off`` and with the last
release's gate evidence (no low parts, no graded evidence), and the
blocked CPU artefact (`rewrite.blocked.blocked_artifact`) of the default and of ``--excess clip``,
on one CIFAR-10 benchmark model.

Ratios in one process, sessions run alternately round by round (order reversed every other round),
medians over rounds of original time / variant time: 1.00 = as fast as the original.

    python benchmarks/gate_cost.py --model vgg_sig [--cifar benchmarks/.cache/cifar] [--rounds 15]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import efficacy
import numpy as np
import onnxruntime as ort

from onnx_linf.commands.clamp import ClampConfig, clamp
from onnx_linf.rewrite.blocked import blocked_artifact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg_sig", help="benchmark model name (a .onnx in --cifar)")
    parser.add_argument("--cifar", type=Path, default=efficacy.ROOT / "benchmarks" / ".cache" / "cifar")
    parser.add_argument("--calib-images", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    args = parser.parse_args(argv)
    cases = [c for c in efficacy.cifar_cases(args.cifar, args.calib_images) if c.name == args.model]
    if not cases:
        print(f"no model {args.model!r} in {args.cifar} (run benchmarks/cifar_models.py)", file=sys.stderr)
        return 2
    case = cases[0]
    protos = {"original": case.model.proto}
    for label, options in (("clamp, --gate off", {"gate": None}), ("clamp, --excess clip", {"excess": "clip"}),
                           ("upper evidence only (last release)", {"low_evidence": False, "evidence_quantile": None,
                                                                  "fold_reference": False}),
                           ("clamp (default: fold, gate on)", {})):
        protos[label] = clamp(case.model, case.calib, ClampConfig(provider="cpu", **options),
                              preprocess=case.preprocess).proto
    check = [{case.model.proto.graph.input[0].name:
              np.random.default_rng(1).normal(0, 1, (4, 3, 32, 32)).astype(np.float32)}]
    protos["--excess clip, blocked artefact"] = blocked_artifact(protos["clamp, --excess clip"], check=check).proto
    protos["default, blocked artefact"] = blocked_artifact(protos["clamp (default: fold, gate on)"], check=check).proto
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {k: ort.InferenceSession(p.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for k, p in protos.items()}
    name = case.model.proto.graph.input[0].name
    print(f"{case.name}: ORT {ort.__version__}, CPU, {args.threads} thread(s), {args.rounds} rounds\n")
    print("| batch | " + " | ".join(sessions) + " |")
    print("|---|" + "---|" * len(sessions))
    for batch, calls in ((16, 20), (1, 100)):
        x = np.random.default_rng(0).normal(0, 1, (batch, 3, 32, 32)).astype(np.float32)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for r in range(args.rounds):
            for k in list(sessions) if r % 2 else list(sessions)[::-1]:
                t0 = time.perf_counter()
                for _ in range(calls):
                    sessions[k].run(None, {name: x})
                times[k].append(time.perf_counter() - t0)
        base = np.array(times["original"])
        ratios = [float(np.median(base / np.array(v))) for v in times.values()]
        print(f"| {batch} | " + " | ".join(f"{r:.2f}×" for r in ratios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
