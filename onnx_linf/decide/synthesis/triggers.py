"""Write synthesized triggers as PNG files (pattern, mask) plus a JSON summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ...model.files import atomic_write, atomic_write_text
from .results import SynthResult


def _png_writer(array: np.ndarray):
    img = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    return lambda p: img.save(p, format="PNG")


def write_triggers(result: SynthResult, out_dir: str | Path) -> None:
    """Write ``class_<c>/trigger.png``, ``class_<c>/mask.png`` per class and ``summary.json``.

    The PNGs load back with `Trigger.from_files` (pattern in L or RGB, mask in L: 255 = trigger) and
    stamp like `ClassTrigger.as_trigger` up to the mask's rounding to 1/255.
    Every file is written atomically.

    Args:
        result: what `synthesize` returned.
        out_dir: output folder (created if missing).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for t in result.triggers:
        folder = out / f"class_{t.target}"
        folder.mkdir(exist_ok=True)
        mask = np.clip(np.rint(t.mask * 255.0), 0, 255).astype(np.uint8)
        pattern = np.clip(np.rint(t.pattern), 0, 255).astype(np.uint8)
        # Where the saved mask is 0 the pattern never reaches an image: black there makes the PNG
        # show the trigger itself instead of the optimiser's leftover noise, and stamps the same.
        pattern[mask == 0] = 0
        atomic_write(folder / "trigger.png", _png_writer(pattern))
        atomic_write(folder / "mask.png", _png_writer(mask))
    atomic_write_text(out / "summary.json", json.dumps(result.to_dict(), indent=2) + "\n")
