"""Preprocessing (pixels -> model input, recorded in every report) and pixel-space triggers."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import CalibrationDataError, UsageError
from ..model.load import Model

log = logging.getLogger(__name__)


#: Model metadata key that may carry preprocessing defaults as JSON (see `Preprocess.from_model`).
PREPROCESS_METADATA_KEY = "onnx_linf.preprocess"


@dataclass(frozen=True)
class Preprocess:
    """How pixels become the model's input tensor: ``((pixels * scale) - mean) / std``.

    Recorded verbatim in every report, because a wrong guess here silently ruins every number.
    """

    size: tuple[int, int]
    """(H, W) images are resized to (bilinear) before anything else."""
    layout: str = "NCHW"
    """Input tensor layout: ``NCHW`` or ``NHWC``."""
    channels: str = "RGB"
    """Channel order fed to the model: ``RGB``, ``BGR`` or ``L`` (grayscale, one channel)."""
    scale: float = 1.0 / 255.0
    """Multiplier applied to uint8 pixels first."""
    mean: tuple[float, ...] = (0.0,)
    """Per-channel mean subtracted after scaling (one value broadcasts)."""
    std: tuple[float, ...] = (1.0,)
    """Per-channel std divided by last (one value broadcasts)."""
    source: str = "defaults"
    """Where these settings came from: ``defaults``, ``model metadata``, ``options`` (or a mix)."""

    @property
    def num_channels(self) -> int:
        """Number of channels of the model input."""
        return 1 if self.channels == "L" else 3

    def to_dict(self) -> dict:
        """JSON-ready form."""
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Turn uint8 pixels ``[N, H, W, C]`` (RGB or L order) into the model's float32 input."""
        x = pixels.astype(np.float32)
        if self.channels == "BGR":
            x = x[..., ::-1]
        x *= np.float32(self.scale)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        x = (x - mean) / std
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=np.float32)

    @classmethod
    def from_model(
        cls,
        model: Model,
        *,
        size: tuple[int, int] | None = None,
        layout: str | None = None,
        channels: str | None = None,
        scale: float | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> Preprocess:
        """Resolve preprocessing: explicit options > model metadata > the input shape > defaults.

        Raises:
            UsageError: the spatial size cannot be known (dynamic dims and no ``size``), or the
                options contradict the model's input shape.
        """
        meta: dict = {}
        for prop in model.proto.metadata_props:
            if prop.key == PREPROCESS_METADATA_KEY:
                try:
                    meta = json.loads(prop.value)
                except json.JSONDecodeError:
                    log.warning("ignoring unparsable %s metadata", PREPROCESS_METADATA_KEY)
        shape = model.input.shape
        sources = set()

        if layout is not None:
            sources.add("options")
        elif "layout" in meta:
            layout = meta["layout"]
            sources.add("model metadata")
        else:
            layout = guess_layout(shape)
        layout = layout.upper()
        if layout not in ("NCHW", "NHWC"):
            raise UsageError(f"layout must be NCHW or NHWC, got {layout!r}")
        c_dim, h_dim, w_dim = (shape[1], shape[2], shape[3]) if layout == "NCHW" else (shape[3], shape[1], shape[2])

        if size is None:
            if isinstance(h_dim, int) and isinstance(w_dim, int):
                size = (h_dim, w_dim)
            else:
                raise UsageError(
                    f"the model's input '{model.input.name}' has dynamic spatial size {shape}; "
                    "pass --size HxW",
                )
        else:
            sources.add("options")

        if channels is not None:
            sources.add("options")
        elif "channels" in meta:
            channels = meta["channels"]
            sources.add("model metadata")
        else:
            channels = "L" if c_dim == 1 else "RGB"
        channels = channels.upper()
        if channels not in ("RGB", "BGR", "L"):
            raise UsageError(f"channel order must be RGB, BGR or L, got {channels!r}")
        wanted_c = 1 if channels == "L" else 3
        if isinstance(c_dim, int) and c_dim != wanted_c:
            raise UsageError(f"the model takes {c_dim} channels ({layout}) but channel order {channels} "
                             f"gives {wanted_c}")

        def pick(value, key, default):
            if value is not None:
                sources.add("options")
                return value
            if key in meta:
                sources.add("model metadata")
                return meta[key]
            return default

        scale_v = float(pick(scale, "scale", 1.0 / 255.0))
        mean_v = tuple(float(v) for v in pick(mean, "mean", (0.0,)))
        std_v = tuple(float(v) for v in pick(std, "std", (1.0,)))
        for name, vec in (("mean", mean_v), ("std", std_v)):
            if len(vec) not in (1, wanted_c):
                raise UsageError(f"--{name} needs 1 or {wanted_c} values for {channels}, got {len(vec)}")
        if any(v == 0 for v in std_v):
            raise UsageError("--std values must be non-zero")
        return cls(size=(int(size[0]), int(size[1])), layout=layout, channels=channels, scale=scale_v,
                   mean=mean_v, std=std_v, source=", ".join(sorted(sources)) or "defaults")


def guess_layout(shape: Sequence[int | str | None]) -> str:
    if shape[1] in (1, 3):
        return "NCHW"
    if shape[3] in (1, 3):
        return "NHWC"
    return "NCHW"


@dataclass(frozen=True)
class Trigger:
    """A trigger stamped in pixel space: ``x' = (1 - m) * x + m * t + d``, clipped to 0..255."""

    pattern: np.ndarray
    """float32 ``[H, W, C]`` pixel values 0..255."""
    mask: np.ndarray
    """float32 ``[H, W, 1]`` or ``[H, W, C]`` in [0, 1]; fractional values blend."""
    description: str = ""
    """Where it came from (file names), for reports."""
    offset: np.ndarray | None = None
    """float32 ``[H, W, 1]`` or ``[H, W, C]`` added after the blend, in pixel units (an additive pattern
    such as a grating); None adds nothing."""

    def stamp(self, pixels: np.ndarray) -> np.ndarray:
        """Return stamped uint8 pixels ``[N, H, W, C]``."""
        if pixels.shape[1:3] != self.pattern.shape[:2]:
            raise CalibrationDataError(
                f"trigger is {self.pattern.shape[0]}x{self.pattern.shape[1]} but images are "
                f"{pixels.shape[1]}x{pixels.shape[2]}")
        out = (1.0 - self.mask) * pixels.astype(np.float32) + self.mask * self.pattern
        if self.offset is not None:
            out = out + self.offset
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    @classmethod
    def from_files(cls, trigger: str | os.PathLike, mask: str | os.PathLike | None,
                   preprocess: Preprocess) -> Trigger:
        """Load a trigger PNG and its mask PNG (white = trigger, grey = blend).

        Without a mask, pixels of the trigger image with alpha > 0 (RGBA) form the mask.

        Raises:
            CalibrationDataError: unreadable files, or sizes that do not match the model input.
        """
        size = preprocess.size
        mode = "L" if preprocess.channels == "L" else "RGB"
        t_path = Path(trigger)
        try:
            with Image.open(t_path) as img:
                img.load()
                alpha = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0 if "A" in img.getbands() else None
                pattern = np.asarray(img.convert(mode), dtype=np.float32)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise CalibrationDataError(f"cannot read trigger image {t_path}: {exc}") from None
        if pattern.shape[:2] != size:
            raise CalibrationDataError(
                f"trigger {t_path.name} is {pattern.shape[0]}x{pattern.shape[1]} but the model input is "
                f"{size[0]}x{size[1]}", hint="draw the trigger at the model's input size")
        if mask is not None:
            m_path = Path(mask)
            try:
                with Image.open(m_path) as img:
                    m = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                raise CalibrationDataError(f"cannot read mask image {m_path}: {exc}") from None
            if m.shape != pattern.shape[:2]:
                raise CalibrationDataError(
                    f"mask {m_path.name} is {m.shape[0]}x{m.shape[1]} but the trigger is "
                    f"{pattern.shape[0]}x{pattern.shape[1]}")
            desc = f"{t_path.name} with mask {m_path.name}"
        elif alpha is not None:
            m, desc = alpha, f"{t_path.name} (alpha channel as mask)"
        else:
            raise CalibrationDataError(f"trigger {t_path.name} has no alpha channel; pass --mask")
        if pattern.ndim == 2:
            pattern = pattern[..., None]
        return cls(pattern=pattern, mask=m[..., None].astype(np.float32), description=desc)
