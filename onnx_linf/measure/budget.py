"""The memory one calibration batch needs, from declared shapes, checked before anything is allocated.

A model can declare any input size: a valid graph with a 1x3x200000x200000 input would have every
calibration image resized to 480 GB of float32, and without a limit the allocation can succeed
(overcommit) and swap the machine to death. Commands therefore bound the bytes of one batch (the
input, its decoded pixels, and every tapped map) by `max_batch_bytes` before they open the data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import onnx

from ..errors import CalibrationDataError
from ..model.load import Model
from ..model.taps import Tap
from .preprocess import Preprocess

log = logging.getLogger(__name__)

#: Environment variable that sets the limit, in bytes (suffixes K, M, G, T allowed: ``16G``).
MAX_BATCH_BYTES_ENV = "ONNX_LINF_MAX_BATCH_BYTES"

#: Default limit: 8 GiB, or half of the available host memory when that is less.
DEFAULT_MAX_BATCH_BYTES = 8 << 30

_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _available_host_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def max_batch_bytes() -> int:
    """The limit on one batch's bytes: `MAX_BATCH_BYTES_ENV` if set, else `DEFAULT_MAX_BATCH_BYTES`
    or half the available host memory, whichever is less.

    Raises:
        CalibrationDataError: the environment variable is not a byte count.
    """
    raw = os.environ.get(MAX_BATCH_BYTES_ENV, "").strip()
    if raw:
        number, scale = (raw[:-1], _SUFFIX[raw[-1].upper()]) if raw[-1].upper() in _SUFFIX else (raw, 1)
        try:
            value = int(float(number) * scale)
        except ValueError:
            raise CalibrationDataError(f"{MAX_BATCH_BYTES_ENV}={raw!r} is not a byte count (e.g. 16G)") from None
        if value <= 0:
            raise CalibrationDataError(f"{MAX_BATCH_BYTES_ENV} must be positive, got {raw!r}")
        return value
    available = _available_host_memory()
    return DEFAULT_MAX_BATCH_BYTES if available is None else min(DEFAULT_MAX_BATCH_BYTES, available // 2)


def _size(n: float) -> str:
    for unit, step in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= step:
            return f"{n / step:.1f} {unit}"
    return f"{int(n)} B"


def input_bytes_per_image(preprocess: Preprocess, itemsize: int = 4) -> int:
    """The model input of one image plus its decoded uint8 pixels."""
    h, w = preprocess.size
    return h * w * preprocess.num_channels * (itemsize + 1)


def require_within(needed: int, what: str, advice: str = "a smaller --batch-size or --size HxW") -> None:
    """Raise unless `needed` bytes fit the limit.

    Raises:
        CalibrationDataError: one line naming what needs the bytes, with a hint (`advice` first).
    """
    limit = max_batch_bytes()
    if needed > limit:
        raise CalibrationDataError(
            f"one calibration batch would need {_size(needed)} of memory ({what}); the limit is {_size(limit)}",
            hint=f"{advice}; {MAX_BATCH_BYTES_ENV} raises the limit")


def check_batch_memory(model: Model, preprocess: Preprocess, batch_size: int = 1, taps: Sequence[Tap] = ()) -> int:
    """Bytes of one batch (input, decoded pixels and every tapped map) from the declared shapes;
    refuse above `max_batch_bytes`. A map whose spatial size is dynamic counts at the input's size.

    Returns:
        The estimate, in bytes.

    Raises:
        CalibrationDataError: the batch would not fit (nothing has been allocated yet).
    """
    fixed = model.input.shape[0] if model.input.shape else None
    if isinstance(fixed, int) and fixed > 0:
        batch_size = fixed  # sessions run a fixed-batch model in batches of exactly that size
    h, w = preprocess.size
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(model.input.elem_type).itemsize if model.input.elem_type else 4
    per_image = input_bytes_per_image(preprocess, itemsize)
    maps = 0
    for tap in taps:
        th, tw = (d if isinstance(d, int) else s for d, s in zip(tap.spatial, (h, w), strict=True))
        item = onnx.helper.tensor_dtype_to_np_dtype(tap.elem_type).itemsize if tap.elem_type else 4
        maps += tap.channels * th * tw * item
    needed = batch_size * (per_image + maps)
    shape = "x".join(str(d) for d in (batch_size, preprocess.num_channels, h, w))
    what = f"input {shape} {model.input.dtype_name}"
    if taps:
        what += f" and {len(taps)} tapped map{'s' if len(taps) > 1 else ''}"
    advice = []
    if batch_size > 1 and not (isinstance(fixed, int) and fixed > 0):
        advice.append(f"pass a smaller --batch-size (1 needs {_size(needed // batch_size)})")
    if any(not isinstance(d, int) for d in model.input.shape[1:]):
        advice.append("pass --size HxW (e.g. --size 224x224): the model's input size is dynamic")
    if not advice:
        advice.append(f"the model declares a fixed input of {'x'.join(map(str, model.input.shape))}, which "
                      "--size and --batch-size cannot shrink: export it at the size it was trained at")
    require_within(needed, what, "; ".join(advice))
    log.debug("one batch needs about %s (%s)", _size(needed), what)
    return needed
