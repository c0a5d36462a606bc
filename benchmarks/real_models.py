"""inspect / scan / clamp / prune on the model-zoo graphs shipped in the onnx wheel (issue 12).

    PYTHONPATH=. python benchmarks/real_models.py [--images 4] [--only resnet50,vgg19] [--json out.json]

The wheel's ``onnx/backend/test/data/light/*.onnx`` are the classic model-zoo graphs (AlexNet,
DenseNet-121, Inception v1/v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512) with their
weights replaced by ConstantOfShape nodes (constant-filled tensors of the real shapes): the graph
structure, IR version 3 layout (initializers = the shapes, also listed as graph inputs) and fixed
batch 1 of the originals. Calibration data: seeded random uint8 pixels at 224x224. Each command
runs as its own process (the real CLI, real stderr), on the CPU provider, with a time limit; the
last lines printed are a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
CLI = [sys.executable, "-c", "from onnx_linf.cli.app import main; main()"]


def first_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("error:") or "Error" in ln:
            return ln[:220]
    return lines[-1][:220] if lines else ""


def run(args: list[str], timeout: int) -> dict:
    start = time.perf_counter()
    try:
        p = subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout)
        rc, err, out = p.returncode, p.stderr, p.stdout
    except subprocess.TimeoutExpired:
        return {"rc": "timeout", "seconds": timeout, "error": f"over {timeout}s"}
    return {"rc": rc, "seconds": round(time.perf_counter() - start, 1),
            "error": "" if rc == 0 else first_error(err), "traceback": "Traceback" in err, "stdout": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--only", default="")
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="real_models_"))
    calib = tmp / "calib.npy"
    np.save(calib, np.random.default_rng(0).integers(0, 256, (opts.images, 224, 224, 3), dtype=np.uint8))
    rows = []
    for model in sorted(LIGHT.glob("*.onnx")):
        name = model.stem.removeprefix("light_")
        if opts.only and name not in opts.only.split(","):
            continue
        row = {"model": name}
        res = run(["inspect", str(model), "--json", "-"], opts.timeout)
        if res["rc"] == 0:
            info = json.loads(res["stdout"])
            taps = info.get("taps", [])
            last = [t for t in taps if t.get("is_last")]
            res["detail"] = f"{len(taps)} maps; last {last[0]['name'] if last else None}"
        row["inspect"] = res
        common = ["--calib", str(calib), "--provider", "cpu", "-q"]
        row["scan"] = run(["scan", str(model), *common], opts.timeout)
        row["clamp"] = run(["clamp", str(model), *common, "-o", str(tmp / f"{name}_clamp.onnx")], opts.timeout)
        row["prune"] = run(["prune", str(model), *common, "--evidence", "none", "-o",
                            str(tmp / f"{name}_prune.onnx")], opts.timeout)
        for k in ("inspect", "scan", "clamp", "prune"):
            row[k].pop("stdout", None)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))


def cell(res: dict) -> str:
    """One table cell: ``ok (2.1 s)`` or ``exit 1: <first error line>``."""
    if res["rc"] == 0:
        return f"ok ({res['seconds']} s)" + (f"; {res['detail']}" if res.get("detail") else "")
    tb = " (traceback)" if res.get("traceback") else ""
    return f"exit {res['rc']}{tb}: {res['error']}"


def markdown(rows: list[dict]) -> str:
    """The results as a Markdown table, one row per model."""
    lines = ["| model | inspect | scan | clamp | prune --evidence none |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append("| " + " | ".join([row["model"]] + [cell(row[k]) for k in ("inspect", "scan", "clamp", "prune")])
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
