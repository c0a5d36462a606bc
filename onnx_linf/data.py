"""Calibration and evaluation data: sources, preprocessing and pixel-space triggers.

Image sources yield *pixels* (uint8, NHWC, already at the model's spatial size) so triggers can be
stamped in pixel space before normalisation; `Preprocess` then turns pixels into the model's input
tensor. Array sources may also yield already-preprocessed float tensors.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import CalibrationDataError, UsageError
from .load import Model

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
#: Model metadata key that may carry preprocessing defaults as JSON (see `Preprocess.from_model`).
PREPROCESS_METADATA_KEY = "onnx_linf.preprocess"


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


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
            layout = _guess_layout(shape)
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


def _guess_layout(shape: Sequence[int | str | None]) -> str:
    if shape[1] in (1, 3):
        return "NCHW"
    if shape[3] in (1, 3):
        return "NHWC"
    return "NCHW"


# --------------------------------------------------------------------------------------------
# Data sources
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A batch of calibration or evaluation data."""

    pixels: np.ndarray | None = None
    """uint8 ``[n, H, W, C]`` at the model's size (None for pre-processed array sources)."""
    tensor: np.ndarray | None = None
    """Already preprocessed model input (None for pixel sources until `Preprocess.apply`)."""
    labels: np.ndarray | None = None
    """int64 ``[n]`` class labels when the source has them."""

    def __len__(self) -> int:
        data = self.pixels if self.pixels is not None else self.tensor
        return 0 if data is None else int(data.shape[0])


@dataclass
class DataSource:
    """Base of calibration sources: knows its length and yields `Batch`es of a given size."""

    description: str = field(default="", init=False)

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[Batch]:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def has_pixels(self) -> bool:
        """True when batches carry uint8 pixels (so triggers can be stamped)."""
        return True

    @property
    def has_labels(self) -> bool:
        """True when batches carry labels."""
        return False


def _decode(path: Path, size: tuple[int, int], mode: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CalibrationDataError(f"cannot read image {path}: {exc}") from None
    return arr[..., None] if arr.ndim == 2 else arr


class ImageFolder(DataSource):
    """Images under a folder (recursive), decoded by Pillow in a thread pool.

    With ``labelled=True`` the folder is ImageFolder-style: one subfolder per class, sorted
    subfolder names are class indices 0..K-1.
    """

    def __init__(self, root: str | os.PathLike, size: tuple[int, int], channels: str = "RGB",
                 labelled: bool = False, workers: int | None = None, limit: int | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise CalibrationDataError(f"calibration folder not found: {root}")
        self.size = size
        self.mode = "L" if channels == "L" else "RGB"
        self.workers = workers or min(8, (os.cpu_count() or 2))
        self.labels: list[int] | None = None
        if labelled:
            classes = sorted(p.name for p in root.iterdir() if p.is_dir())
            if not classes:
                raise CalibrationDataError(f"labelled folder {root} has no class subfolders")
            files, labels = [], []
            for k, cls_name in enumerate(classes):
                for f in _list_images(root / cls_name):
                    files.append(f)
                    labels.append(k)
            self.files, self.labels = files, labels
        else:
            self.files = _list_images(root)
        if limit is not None:
            self.files = self.files[:limit]
            self.labels = self.labels[:limit] if self.labels is not None else None
        if not self.files:
            raise CalibrationDataError(
                f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, recursively)"
            )
        self.description = f"{len(self.files)} images from {root}"

    def __len__(self) -> int:
        return len(self.files)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def batches(self, batch_size: int) -> Iterator[Batch]:
        size, mode = self.size, self.mode
        chunks = [range(i, min(i + batch_size, len(self.files))) for i in range(0, len(self.files), batch_size)]

        def load(chunk: range) -> Batch:
            pixels = np.stack([_decode(self.files[i], size, mode) for i in chunk])
            labels = np.asarray([self.labels[i] for i in chunk], dtype=np.int64) if self.labels else None
            return Batch(pixels=pixels, labels=labels)

        # Decode ahead of the consumer: ORT and Pillow both release the GIL, so decoding the next
        # batches overlaps inference of the current one. `map` keeps order; the bounded window
        # keeps memory constant in the number of images.
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            window = max(2, self.workers)
            pending = []
            it = iter(chunks)
            for chunk in it:
                pending.append(pool.submit(load, chunk))
                if len(pending) >= window:
                    break
            while pending:
                batch = pending.pop(0).result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(load, nxt))
                yield batch


def _list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ArraySource(DataSource):
    """Arrays from ``.npy`` / ``.npz`` files.

    ``uint8`` arrays are pixels ``[N, H, W, C]`` (``[N, H, W]`` for grayscale) and get the
    preprocessing; float arrays are taken as already-preprocessed model input in the model's
    layout. An ``.npz`` holds ``x`` (or its only array) and optionally labels ``y``.
    """

    def __init__(self, path: str | os.PathLike, size: tuple[int, int] | None = None,
                 channels: str | None = None, limit: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise CalibrationDataError(f"data file not found: {path}")
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as data:
                    keys = list(data.keys())
                    key = "x" if "x" in keys else keys[0] if len(keys) == 1 else None
                    if key is None:
                        raise CalibrationDataError(f"{path}: expected an array named 'x' (found {keys})")
                    x = data[key]
                    y = data["y"] if "y" in keys else None
            else:
                x, y = np.load(path, allow_pickle=False), None
        except (ValueError, OSError, EOFError) as exc:
            raise CalibrationDataError(f"cannot read arrays from {path}: {exc}") from None
        if limit is not None:
            x = x[:limit]
            y = y[:limit] if y is not None else None
        if len(x) == 0:
            raise CalibrationDataError(f"{path} holds no samples")
        if y is not None and len(y) != len(x):
            raise CalibrationDataError(f"{path}: {len(x)} samples but {len(y)} labels")
        if x.dtype == np.uint8:
            if x.ndim == 3:
                x = x[..., None]
            if x.ndim != 4 or x.shape[-1] not in (1, 3):
                raise CalibrationDataError(
                    f"{path}: uint8 pixels must be [N,H,W,C] with C in (1, 3), got shape {list(x.shape)}")
            if size is not None and tuple(x.shape[1:3]) != tuple(size):
                raise CalibrationDataError(
                    f"{path}: images are {x.shape[1]}x{x.shape[2]} but the model takes {size[0]}x{size[1]}")
            if channels is not None:
                want = 1 if channels == "L" else 3
                if x.shape[-1] != want:
                    raise CalibrationDataError(
                        f"{path}: images have {x.shape[-1]} channels but the model takes {want}")
            self._pixels = True
        elif np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32, copy=False)
            self._pixels = False
        else:
            raise CalibrationDataError(f"{path}: expected uint8 pixels or float tensors, got {x.dtype}")
        self.x = x
        self.y = None if y is None else np.asarray(y, dtype=np.int64)
        kind = "pixels" if self._pixels else "preprocessed tensors"
        self.description = f"{len(x)} {kind} from {path}"

    def __len__(self) -> int:
        return len(self.x)

    @property
    def has_pixels(self) -> bool:
        return self._pixels

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(0, len(self.x), batch_size):
            data = self.x[i:i + batch_size]
            labels = self.y[i:i + batch_size] if self.y is not None else None
            yield Batch(pixels=data, labels=labels) if self._pixels else Batch(tensor=data, labels=labels)


class FeedSource(DataSource):
    """Any sequence of preprocessed input arrays (the library's simplest data contract)."""

    def __init__(self, arrays: Sequence[np.ndarray], labels: Sequence[int] | None = None) -> None:
        self.x = np.concatenate([np.asarray(a, dtype=np.float32) for a in arrays]) if arrays else None
        if self.x is None or len(self.x) == 0:
            raise CalibrationDataError("no input arrays given")
        self.y = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.description = f"{len(self.x)} preprocessed samples"

    def __len__(self) -> int:
        return len(self.x)

    @property
    def has_pixels(self) -> bool:
        return False

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(0, len(self.x), batch_size):
            yield Batch(tensor=self.x[i:i + batch_size],
                        labels=None if self.y is None else self.y[i:i + batch_size])


class ScriptSource(DataSource):
    """Batches from a user's data-loader script, for models whose inputs are not plain images.

    Same convention as Polygraphy's ``--data-loader-script``: a Python file defining a function
    (``load_data`` unless named as ``script.py:func``) that returns an iterable of feed dicts
    ``{input_name: array}`` or of bare arrays, each already preprocessed, with a batch axis.
    """

    def __init__(self, spec: str | os.PathLike, input_name: str, limit: int | None = None) -> None:
        text = str(spec)
        path_text, func = (text.rsplit(":", 1) if ".py:" in text else (text, ""))
        path = Path(path_text)
        if not path.is_file():
            raise CalibrationDataError(f"data-loader script not found: {path}")
        import importlib.util

        module_spec = importlib.util.spec_from_file_location(f"onnx_linf_loader_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's code: report it as a data problem, in one line
            raise CalibrationDataError(f"data-loader script {path} failed to import: {type(exc).__name__}: {exc}") \
                from None
        self.func_name = func or "load_data"
        if not callable(getattr(module, self.func_name, None)):
            raise CalibrationDataError(f"data-loader script {path} defines no function {self.func_name}()")
        self.func = getattr(module, self.func_name)
        self.input_name = input_name
        self.limit = limit
        self._count: int | None = None
        self.description = f"batches from {path.name}:{self.func_name}()"

    def __len__(self) -> int:
        if self._count is None:  # one dry pass: scripts are expected to be cheap to iterate
            self._count = sum(len(b) for b in self._raw())
        return self._count

    @property
    def has_pixels(self) -> bool:
        return False

    def _raw(self) -> Iterator[Batch]:
        seen = 0
        for item in self.func():
            if isinstance(item, dict):
                if self.input_name not in item:
                    raise CalibrationDataError(f"data-loader feed has no '{self.input_name}' (keys: {sorted(item)})")
                item = item[self.input_name]
            arr = np.asarray(item, dtype=np.float32)
            if self.limit is not None:
                arr = arr[: max(0, self.limit - seen)]
            if len(arr) == 0:
                break
            seen += len(arr)
            yield Batch(tensor=arr)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        # The script fixes its own batches; `batch_size` only re-chunks batches that are larger.
        for batch in self._raw():
            for i in range(0, len(batch), batch_size):
                yield Batch(tensor=batch.tensor[i:i + batch_size])


def open_source(path: str | os.PathLike, preprocess: Preprocess, *, labelled: bool = False,
                limit: int | None = None, input_name: str = "input") -> DataSource:
    """Open a calibration/evaluation source by path: an image folder or an ``.npy``/``.npz`` file.

    Raises:
        CalibrationDataError: the path does not exist or holds no usable data.
    """
    if str(path).split(":")[0].endswith(".py"):
        return ScriptSource(path, input_name, limit=limit)
    path = Path(path)
    if path.is_dir():
        return ImageFolder(path, preprocess.size, preprocess.channels, labelled=labelled, limit=limit)
    if path.suffix in (".npy", ".npz"):
        return ArraySource(path, preprocess.size, preprocess.channels, limit=limit)
    if not path.exists():
        raise CalibrationDataError(f"data path not found: {path}")
    raise CalibrationDataError(f"unsupported data path {path}: give a folder of images, a .npy/.npz file "
                               "or a data-loader script (.py)")


# --------------------------------------------------------------------------------------------
# Triggers (pixel space)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    """A trigger stamped in pixel space: ``x' = (1 - m) * x + m * t``."""

    pattern: np.ndarray
    """float32 ``[H, W, C]`` pixel values 0..255."""
    mask: np.ndarray
    """float32 ``[H, W, 1]`` or ``[H, W, C]`` in [0, 1]; fractional values blend."""
    description: str = ""
    """Where it came from (file names), for reports."""

    def stamp(self, pixels: np.ndarray) -> np.ndarray:
        """Return stamped uint8 pixels ``[N, H, W, C]``."""
        if pixels.shape[1:3] != self.pattern.shape[:2]:
            raise CalibrationDataError(
                f"trigger is {self.pattern.shape[0]}x{self.pattern.shape[1]} but images are "
                f"{pixels.shape[1]}x{pixels.shape[2]}")
        out = (1.0 - self.mask) * pixels.astype(np.float32) + self.mask * self.pattern
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


