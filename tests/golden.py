"""Golden-file comparison: whole JSON documents, volatile fields normalised, floats compared to 1e-3.

Regenerate with ONNX_LINF_REGEN_GOLDEN=1 and review the diff before committing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
VOLATILE = {"path": "<path>", "tool_version": "<version>", "provider": "<provider>", "source": None}


def normalise(doc, key: str | None = None):
    if isinstance(doc, dict):
        out = {}
        for k, v in doc.items():
            if k in VOLATILE and VOLATILE[k] is not None:
                out[k] = VOLATILE[k]
            elif k == "source" and isinstance(v, str) and " from " in v:
                out[k] = v.split(" from ")[0] + " from <path>"
            else:
                out[k] = normalise(v, k)
        return out
    if isinstance(doc, list):
        return [normalise(v) for v in doc]
    if isinstance(doc, float):
        return float(f"{doc:.6g}")
    return doc


def assert_close(got, want, where="$"):
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        assert sorted(got) == sorted(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: length"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) or isinstance(got, float):
        assert math.isclose(got, want, rel_tol=1e-3, abs_tol=1e-4), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def check_golden(name: str, doc: dict) -> None:
    doc = normalise(doc)
    path = GOLDEN_DIR / name
    if os.environ.get("ONNX_LINF_REGEN_GOLDEN") == "1" or not path.exists():
        if os.environ.get("ONNX_LINF_REGEN_GOLDEN") != "1":
            raise AssertionError(f"golden file {path} missing: run with ONNX_LINF_REGEN_GOLDEN=1")
        path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        return
    assert_close(doc, json.loads(path.read_text()))
