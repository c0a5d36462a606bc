"""Calibration and evaluation data sources: image folders, arrays, feeds and data-loader scripts.

Image sources yield *pixels* (uint8, NHWC, already at the model's spatial size) so triggers can be
stamped in pixel space before normalisation; `Preprocess` then turns pixels into the model's input
tensor. Array sources may also yield already-preprocessed float tensors.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import CalibrationDataError
from .preprocess import Preprocess

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})


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

    def shard(self, start: int, stop: int) -> DataSource | None:
        """Samples ``start:stop`` as a source of their own, for engines that measure shards apart.

        None: this source cannot be cut without reading it (a data-loader script).
        """
        return None


#: Largest image (decoded or resized to) in pixels: Pillow's decompression-bomb limit, so a file that
#: declares 30000x30000 is refused from its header and never decoded.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

#: Pillow modes of images with more than 8 bits per channel (16-bit PNG/TIFF, 32-bit integer or float).
DEEP_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;16S"})


def _decode(path: Path, size: tuple[int, int], mode: str) -> np.ndarray:
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise CalibrationDataError(f"cannot resize images to {size[0]}x{size[1]}: more than {MAX_IMAGE_PIXELS} "
                                   "pixels", hint="pass --size HxW (e.g. --size 224x224)")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise CalibrationDataError(f"image {path} is {img.width}x{img.height}, more than {MAX_IMAGE_PIXELS} "
                                           "pixels: refused undecoded")
            if img.mode in DEEP_MODES:
                # Converting to 8 bits clips every value above 255 (a 16-bit PNG turns white), and
                # the right rescaling (full 16-bit range? 12 bits of a medical scan?) is the user's call.
                raise CalibrationDataError(
                    f"{32 if img.mode in ('I', 'F') else 16}-bit image {path} (Pillow mode {img.mode}): "
                    "onnx-linf reads 8-bit images",
                    hint="convert the images to 8 bits, or pass preprocessed float arrays (.npy) in the model's layout")
            img = img.convert(mode)
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
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

    def shard(self, start: int, stop: int) -> ImageFolder:
        # A shard is the same folder with a slice of its (sorted) file list: only paths travel.
        out = copy.copy(self)
        out.files = self.files[start:stop]
        out.labels = None if self.labels is None else self.labels[start:stop]
        out.description = f"images {start}:{stop} of {self.description}"
        return out

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

    def shard(self, start: int, stop: int) -> ArraySource:
        return _slice(self, start, stop)

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

    def shard(self, start: int, stop: int) -> FeedSource:
        return _slice(self, start, stop)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(0, len(self.x), batch_size):
            yield Batch(tensor=self.x[i:i + batch_size],
                        labels=None if self.y is None else self.y[i:i + batch_size])


def _slice(source, start: int, stop: int):
    """A copy of an in-memory source holding samples ``start:stop`` (views, not copies, of its arrays)."""
    out = copy.copy(source)
    out.x = source.x[start:stop]
    out.y = None if source.y is None else source.y[start:stop]
    out.description = f"samples {start}:{stop} of {source.description}"
    return out


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
