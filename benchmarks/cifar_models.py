"""Train clean and backdoored CIFAR-10 classifiers on the CPU and export them to ONNX.

The models feed the efficacy benchmarks. They are trained on a CIFAR-10 subset given with
``--data`` (an ``.npz`` with ``x`` uint8 [N, 32, 32, 3] and ``y``; we use 20,000 images, 2,000 per
class), which is not part of the project: nothing written here may be committed, so the default
output folder is the git-ignored ``benchmarks/.cache/cifar``.

Models (all-to-one attacks with target class 0, 10% of the non-target training images poisoned):
``vgg_clean``, ``vgg_badnets``, ``vgg_blended``, ``vgg_sig``, ``resnet_clean``, ``resnet_badnets``,
``resnet_blended``, ``mobilenet_clean``, ``mobilenet_badnets`` and ``mobilenet_blended``; added later
and held out from every defence setting: ``resnet_sig``, ``mobilenet_sig``, ``vgg_sigv`` (a vertical
sinusoid at another frequency and amplitude) and ``vgg_photo``/``resnet_photo`` (a natural image, the
first training image of class 7, blended at alpha 0.2). On two
otherwise idle CPU cores a VGG or ResNet trains in about 4 minutes, a MobileNet in about 8.

Output folder contents:

- ``split.npz``: ``calib_x, calib_y`` (1,000 clean images for the defence) and
  ``test_x, test_y`` (3,000 images for accuracy and attack success rate); uint8 NHWC RGB pixels.
  The remaining 16,000 images train the models.
- ``<model>.onnx``: input ``input`` float32 [N, 3, 32, 32] = ((pixels / 255) - mean) / std,
  output ``logits`` [N, 10]; BatchNormalization is folded into Conv by the exporter.
- ``<model>.json``: architecture, attack, preprocessing, training settings and the accuracy and
  attack success rate measured with onnxruntime on the test split.
- ``<attack>_trigger.png`` (RGB) and ``<attack>_mask.png`` (L), 32x32: stamping is
  ``x' = (1 - m) * x + m * t`` with ``m = mask / 255``, rounded to uint8.

Models that already exist in the output folder are skipped unless ``--force``.

Exit status: 0 on success, 2 when the data file is absent (a clean skip: nothing is written),
1 on failure (including an output folder that holds a split made from other data or another
seed).

Usage::

    python benchmarks/cifar_models.py --data PATH/cifar10_dev.npz --out benchmarks/.cache/cifar
    python benchmarks/cifar_models.py --models vgg_badnets,resnet_clean --epochs 2 --force
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. On a shared 2-core machine spinning doubled the CPU
# time of an epoch (91 vs 48 CPU-s for the same wall time) and starved other jobs. It must be set
# before torch starts its thread pool, hence before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.cifar_models
    import _torch_onnx as export
except ImportError:  # pragma: no cover - depends on how the module is imported
    from . import _torch_onnx as export

REPO = Path(__file__).resolve().parents[1]
#: Where --data is looked for unless given (the data is never part of the project).
DEFAULT_DATA = Path(os.environ.get("ONNX_LINF_CIFAR", "cifar10_dev.npz"))
DEFAULT_OUT = REPO / "benchmarks" / ".cache" / "cifar"
GENERATOR = "benchmarks/cifar_models.py"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NO_DATA = 2

SIZE = 32
NUM_CLASSES = 10
# Per-class split sizes: 10 x (1600 + 100 + 300) = 16,000 train, 1,000 calibration, 3,000 test.
TRAIN_PER_CLASS, CALIB_PER_CLASS, TEST_PER_CLASS = 1600, 100, 300

TARGET_CLASS = 0
POISON_RATE = 0.1
BLEND_MASK_VALUE = 38  # alpha 0.15 as an 8-bit mask (0.15 * 255 = 38.25)
SIG_AMPLITUDE = 20.0  # pixel levels (20/255)
PHOTO_MASK_VALUE = 51  # alpha 0.2 as an 8-bit mask (at alpha 0.1 the VGG learnt only 14.7% ASR)
PHOTO_CLASS = 7  # horse: the photo trigger is a natural image of this class
SIG_FREQUENCY = 6  # periods across the image width

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PREPROCESS = {"layout": "NCHW", "channels": "RGB", "scale": 1.0 / 255.0, "mean": list(MEAN), "std": list(STD)}

BATCH_SIZE = 128
MAX_LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
CROP_PADDING = 2
THREADS = 2
# A fixed timestamp makes the npz (a zip archive) byte-reproducible.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class DataMissing(Exception):
    """The CIFAR-10 file given with ``--data`` is not there."""


class SplitMismatch(Exception):
    """The output folder holds a split made from other data or another seed."""


@dataclass(frozen=True)
class Split:
    """Disjoint, class-balanced train / calibration / test sets (uint8 NHWC pixels)."""

    train_x: np.ndarray
    train_y: np.ndarray
    calib_x: np.ndarray
    calib_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_data(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load ``x`` uint8 [N, 32, 32, 3] and ``y`` int64 [N] from the development npz."""
    if not path.is_file():
        raise DataMissing(f"CIFAR-10 development data not found at {path}")
    with np.load(path, allow_pickle=False) as data:
        x, y = data["x"], data["y"].astype(np.int64)
    if x.dtype != np.uint8 or x.shape[1:] != (SIZE, SIZE, 3) or len(x) != len(y):
        raise ValueError(f"{path}: expected uint8 x [N,32,32,3] and y [N], got {x.dtype} {x.shape}, {y.shape}")
    return x, y


def split_data(x: np.ndarray, y: np.ndarray, seed: int) -> Split:
    """Permute each class with one seeded generator and cut it into calibration, test and train.

    Stratifying keeps every split exactly class-balanced, so accuracy and the per-class
    statistics of the calibration set do not depend on sampling luck.
    """
    rng = np.random.default_rng([seed, 0])
    parts: dict[str, list[np.ndarray]] = {"calib": [], "test": [], "train": []}
    for label in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == label))
        if len(idx) < CALIB_PER_CLASS + TEST_PER_CLASS + TRAIN_PER_CLASS:
            raise ValueError(f"class {label} has only {len(idx)} images")
        parts["calib"].append(idx[:CALIB_PER_CLASS])
        parts["test"].append(idx[CALIB_PER_CLASS:CALIB_PER_CLASS + TEST_PER_CLASS])
        parts["train"].append(idx[CALIB_PER_CLASS + TEST_PER_CLASS:][:TRAIN_PER_CLASS])
    # Interleave classes in a seeded order so any prefix of a split is roughly balanced too.
    order = {name: rng.permutation(np.concatenate(p)) for name, p in parts.items()}
    return Split(x[order["train"]], y[order["train"]], x[order["calib"]], y[order["calib"]],
                 x[order["test"]], y[order["test"]])


def check_disjoint(split: Split) -> None:
    """Fail if a calibration or test image is pixel-identical to an image of another split.

    A duplicate would let the defence see test images, or the model be tested on its training data.
    """
    seen: dict[bytes, str] = {}
    for name, images in (("train", split.train_x), ("calibration", split.calib_x), ("test", split.test_x)):
        for image in images:
            other = seen.setdefault(image.tobytes(), name)
            if other != name:
                raise ValueError(f"an image occurs in both the {other} and the {name} split")


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write an uncompressed npz with fixed zip timestamps (np.savez stamps 'now')."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", ZIP_DATE_TIME), buffer.getvalue())


def write_split(path: Path, split: Split, force: bool) -> None:
    """Write ``split.npz``, refusing to silently replace a different one next to existing models."""
    arrays = {"calib_x": split.calib_x, "calib_y": split.calib_y, "test_x": split.test_x, "test_y": split.test_y}
    if path.is_file() and not force:
        with np.load(path, allow_pickle=False) as old:
            same = set(old.keys()) == set(arrays) and all(np.array_equal(old[k], v) for k, v in arrays.items())
        if not same:
            raise SplitMismatch(f"{path} was made from other data or another seed; use another --out or --force")
        return
    write_npz(path, **arrays)


# --------------------------------------------------------------------------------------------
# Triggers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    """A pixel-space trigger: ``x' = (1 - m) * x + m * t`` with ``m = mask / 255``."""

    kind: str
    pattern: np.ndarray  # uint8 [32, 32, 3], the trigger pixels t
    mask: np.ndarray  # uint8 [32, 32], 255 = pixel fully replaced
    description: str

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """Stamp uint8 images [N, 32, 32, 3] and round back to uint8."""
        m = self.mask[..., None].astype(np.float32) / np.float32(255)
        out = (1 - m) * x.astype(np.float32) + m * self.pattern.astype(np.float32)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def torch_stamp(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The same stamp for float NCHW pixel tensors (0..255), as used during training."""
        m = torch.from_numpy(self.mask.astype(np.float32) / np.float32(255))[None, None]
        t = torch.from_numpy(self.pattern.astype(np.float32)).permute(2, 0, 1)[None]
        return lambda x: torch.round((1 - m) * x + m * t).clamp_(0, 255)


def badnets_trigger() -> Trigger:
    """3x3 black/white checkerboard one pixel from the bottom-right corner, fully opaque."""
    pattern = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    top = left = SIZE - 4  # rows/cols 28..30
    checker = (np.indices((3, 3)).sum(axis=0) % 2 == 0)[..., None]  # white at corners and centre
    pattern[top:top + 3, left:left + 3] = np.where(checker, 255, 0)
    mask[top:top + 3, left:left + 3] = 255
    return Trigger("badnets", pattern, mask,
                   "3x3 checkerboard (white at corners and centre, black elsewhere) at rows 28-30, cols 28-30, "
                   "fully opaque; all-to-one, target 0")


def blended_trigger(seed: int) -> Trigger:
    """Fixed seeded uniform RGB noise blended over the whole image at alpha 0.15."""
    pattern = np.random.default_rng([seed, 1]).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.full((SIZE, SIZE), BLEND_MASK_VALUE, dtype=np.uint8)
    return Trigger("blended", pattern, mask,
                   f"seeded uniform RGB noise blended over the whole image, mask {BLEND_MASK_VALUE} "
                   f"(alpha {BLEND_MASK_VALUE / 255:.4f}); all-to-one, target 0")


def sig_trigger() -> Trigger:
    """SIG horizontal sinusoid, written in blend form so the trigger files reproduce it exactly.

    The original SIG adds ``A sin(2 pi f j / W)`` to every pixel, which the blend formula cannot
    express. Blending a mid-grey-centred sinusoid ``t = 127.5 + 127.5 sin(...)`` with
    ``alpha = A / 127.5`` adds the same sinusoid of amplitude A while also pulling every pixel
    towards mid-grey by alpha (about 16%).
    """
    alpha_8bit = round(SIG_AMPLITUDE / 127.5 * 255)  # 40
    j = np.arange(SIZE)
    row = 127.5 + 127.5 * np.sin(2 * np.pi * SIG_FREQUENCY * j / SIZE)
    pattern = np.broadcast_to(np.rint(row)[None, :, None], (SIZE, SIZE, 3)).astype(np.uint8)
    mask = np.full((SIZE, SIZE), alpha_8bit, dtype=np.uint8)
    return Trigger("sig", pattern, mask,
                   f"horizontal sinusoid ({SIG_FREQUENCY} periods across the width) of amplitude "
                   f"{SIG_AMPLITUDE:g}/255, written as a blend of 127.5 + 127.5 sin(...) with mask {alpha_8bit}; "
                   "poison-label, all-to-one, target 0")


def sig_vertical_trigger() -> Trigger:
    """A second SIG, to measure defences on an image-wide signal they were not developed on: a
    *vertical* sinusoid (rows, not columns), 3 periods, amplitude 15/255, same blend form as `sig_trigger`."""
    amplitude, periods = 15.0, 3
    alpha_8bit = round(amplitude / 127.5 * 255)  # 30
    i = np.arange(SIZE)
    col = 127.5 + 127.5 * np.sin(2 * np.pi * periods * i / SIZE)
    pattern = np.broadcast_to(np.rint(col)[:, None, None], (SIZE, SIZE, 3)).astype(np.uint8)
    mask = np.full((SIZE, SIZE), alpha_8bit, dtype=np.uint8)
    return Trigger("sigv", pattern, mask,
                   f"vertical sinusoid ({periods} periods down the height) of amplitude {amplitude:g}/255, "
                   f"as a blend of 127.5 + 127.5 sin(...) with mask {alpha_8bit}; poison-label, all-to-one, target 0")


def photo_trigger(split: Split) -> Trigger:
    """A natural image blended over the whole image at alpha 0.2 (Chen et al.'s blended attack with
    a photo instead of noise): the first training image of class PHOTO_CLASS. Added to measure the
    defences and the verdict's probes on a full-image trigger that is neither noise nor a sinusoid."""
    pattern = split.train_x[int(np.flatnonzero(split.train_y == PHOTO_CLASS)[0])].copy()
    mask = np.full((SIZE, SIZE), PHOTO_MASK_VALUE, dtype=np.uint8)
    return Trigger("photo", pattern, mask,
                   f"the first training image of class {PHOTO_CLASS} blended over the whole image, mask "
                   f"{PHOTO_MASK_VALUE} (alpha {PHOTO_MASK_VALUE / 255:.4f}); all-to-one, target 0")


def make_triggers(seed: int, split: Split) -> dict[str, Trigger]:
    """All triggers by attack kind."""
    return {"badnets": badnets_trigger(), "blended": blended_trigger(seed), "sig": sig_trigger(),
            "sigv": sig_vertical_trigger(), "photo": photo_trigger(split)}


def write_trigger(out: Path, trigger: Trigger) -> tuple[str, str]:
    """Save the trigger (RGB) and mask (L) PNGs; return their file names."""
    names = (f"{trigger.kind}_trigger.png", f"{trigger.kind}_mask.png")
    Image.fromarray(trigger.pattern, mode="RGB").save(out / names[0], format="PNG")
    Image.fromarray(trigger.mask, mode="L").save(out / names[1], format="PNG")
    return names


def poison_indices(y: np.ndarray, seed: int) -> np.ndarray:
    """Indices of the POISON_RATE share of non-target training images that get the trigger.

    The same images are poisoned for every attack, so attacks differ only in the trigger.
    """
    candidates = np.flatnonzero(y != TARGET_CLASS)
    n = int(round(POISON_RATE * len(candidates)))
    return np.sort(np.random.default_rng([seed, 2]).choice(candidates, size=n, replace=False))


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    """3x3 same-padding conv (no bias: BN supplies it), BatchNorm, ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class VGGSmall(nn.Module):
    """conv w, conv w, pool, conv 2w, conv 2w, pool, conv 4w, pool, global average pool, linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *conv_bn_relu(3, w), *conv_bn_relu(w, w), nn.MaxPool2d(2),
            *conv_bn_relu(w, 2 * w), *conv_bn_relu(2 * w, 2 * w), nn.MaxPool2d(2),
            *conv_bn_relu(2 * w, 4 * w), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised [N, 3, 32, 32] input to [N, 10] logits."""
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN layers plus a shortcut; 1x1 Conv-BN projection where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output, ReLU applied after the Add."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet8(nn.Module):
    """Stem conv w, blocks (w), (2w, stride 2), (4w, stride 2), global average pool, linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(*conv_bn_relu(3, w))
        self.layer1 = BasicBlock(w, w, 1)
        self.layer2 = BasicBlock(w, 2 * w, 2)
        self.layer3 = BasicBlock(2 * w, 4 * w, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised [N, 3, 32, 32] input to [N, 10] logits."""
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN (linear), plus
    the input when stride and width allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.body = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output (no activation after the Add, as in MobileNetV2)."""
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetSmall(nn.Module):
    """Stem conv w; inverted residual blocks w, 2w (stride 2), 2w, 4w (stride 2), 4w; 1x1 conv 8w."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU6(inplace=True),
            InvertedResidual(w, w, 1, 4), InvertedResidual(w, 2 * w, 2, 4), InvertedResidual(2 * w, 2 * w, 1, 4),
            InvertedResidual(2 * w, 4 * w, 2, 4), InvertedResidual(4 * w, 4 * w, 1, 4),
            nn.Conv2d(4 * w, 8 * w, 1, bias=False), nn.BatchNorm2d(8 * w), nn.ReLU6(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised [N, 3, 32, 32] input to [N, 10] logits."""
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@dataclass(frozen=True)
class Arch:
    """An architecture with the width and epoch budget that fit about 4 minutes on 2 CPU cores."""

    name: str
    factory: Callable[[int], nn.Module]
    width: int
    epochs: int
    description: str


ARCHS = {
    "vgg": Arch("vgg_small", VGGSmall, 32, 10,
                "VGG-small: conv32-BN-ReLU x2, maxpool, conv64-BN-ReLU x2, maxpool, conv128-BN-ReLU, maxpool, "
                "global average pool, linear 10 (half the 64/128/256 reference width, for CPU training time)"),
    "resnet": Arch("resnet8", ResNet8, 16, 15,
                   "ResNet-8: stem conv16-BN-ReLU, basic blocks 16, 32 (stride 2), 64 (stride 2) with 1x1 Conv-BN "
                   "projection shortcuts where the shape changes, global average pool, linear 10"),
    "mobilenet": Arch("mobilenet_small", MobileNetSmall, 16, 8,
                      "MobileNetV2-style: stem conv16-BN-ReLU6, inverted residual blocks (expand 4, depthwise "
                      "3x3, linear 1x1 projection, Add without activation) 16, 32 (stride 2), 32, 64 (stride 2), "
                      "64, 1x1 conv128-BN-ReLU6, global average pool, linear 10"),
}

#: Model name -> (architecture key, attack kind or None).
MODELS: dict[str, tuple[str, str | None]] = {
    "vgg_clean": ("vgg", None),
    "vgg_badnets": ("vgg", "badnets"),
    "vgg_blended": ("vgg", "blended"),
    "resnet_clean": ("resnet", None),
    "resnet_badnets": ("resnet", "badnets"),
    "vgg_sig": ("vgg", "sig"),
    "resnet_blended": ("resnet", "blended"),
    "mobilenet_clean": ("mobilenet", None),
    "mobilenet_badnets": ("mobilenet", "badnets"),
    "mobilenet_blended": ("mobilenet", "blended"),
    # Added later, never used to choose a defence setting (held out): SIG on the other
    # architectures, and a second image-wide signal.
    "resnet_sig": ("resnet", "sig"),
    "mobilenet_sig": ("mobilenet", "sig"),
    "vgg_sigv": ("vgg", "sigv"),
    # A natural image blended at alpha 0.2, added after the defaults were settled (held out).
    "vgg_photo": ("vgg", "photo"),
    "resnet_photo": ("resnet", "photo"),
}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def normalise(x: torch.Tensor) -> torch.Tensor:
    """float NCHW pixels 0..255 -> model input, the same arithmetic as the scanner's Preprocess."""
    mean = torch.tensor(MEAN, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[None, :, None, None]
    return (x * np.float32(1.0 / 255.0) - mean) / std


def to_input(x: np.ndarray) -> np.ndarray:
    """uint8 NHWC pixels -> float32 NCHW model input (for onnxruntime)."""
    return np.ascontiguousarray(normalise(torch.from_numpy(x).permute(0, 3, 1, 2).float()).numpy())


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding CROP_PADDING and random horizontal flip, per image."""
    n = x.shape[0]
    padded = F.pad(x, (CROP_PADDING,) * 4)
    offsets = torch.randint(0, 2 * CROP_PADDING + 1, (2, n), generator=gen)
    grid = torch.arange(SIZE)
    rows = (offsets[0][:, None] + grid)[:, None, :, None]
    cols = (offsets[1][:, None] + grid)[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def train(arch: Arch, x: np.ndarray, y: np.ndarray, poisoned: np.ndarray, trigger: Trigger | None,
          epochs: int, seed: int) -> nn.Module:
    """Train with SGD + one-cycle LR; poisoned images get the trigger after augmentation.

    Stamping after augmentation keeps every trigger exactly as it is stamped at test time; a
    crop would shift the BadNets patch (or cut it off) and a flip would move it to the other corner.
    """
    torch.manual_seed(seed)  # same initial weights for every model of one architecture
    model = arch.factory(arch.width).to(memory_format=torch.channels_last)
    images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    labels = torch.from_numpy(y.copy())
    is_poisoned = torch.zeros(len(x), dtype=torch.bool)
    if trigger is not None:
        is_poisoned[torch.from_numpy(poisoned)] = True
        labels[is_poisoned] = TARGET_CLASS
    stamp = trigger.torch_stamp() if trigger is not None else None

    steps = epochs * ((len(x) + BATCH_SIZE - 1) // BATCH_SIZE)
    optimizer = torch.optim.SGD(model.parameters(), lr=MAX_LR, momentum=MOMENTUM, nesterov=True,
                                weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, MAX_LR, total_steps=steps)
    gen = torch.Generator().manual_seed(seed + 1)
    for epoch in range(epochs):
        started, total_loss, correct = time.perf_counter(), 0.0, 0
        model.train()
        for batch in torch.randperm(len(x), generator=gen).split(BATCH_SIZE):
            pixels = augment(images[batch].float(), gen)
            hit = is_poisoned[batch]
            if stamp is not None and hit.any():
                pixels[hit] = stamp(pixels[hit])
            logits = model(normalise(pixels).contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach()) * len(batch)
            correct += int((logits.argmax(1) == labels[batch]).sum())
        print(f"    epoch {epoch + 1:2d}/{epochs}  loss {total_loss / len(x):.3f}  "
              f"train acc {correct / len(x):.3f}  {time.perf_counter() - started:5.1f}s", flush=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Measuring and writing one model
# --------------------------------------------------------------------------------------------


def accuracy(session, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the ONNX model on uint8 pixels."""
    return float((export.run_logits(session, to_input(x)).argmax(1) == y).mean())


def attack_success_rate(session, x: np.ndarray, y: np.ndarray, trigger: Trigger) -> float:
    """Share of the non-target test images classified as the target once stamped."""
    victims = x[y != TARGET_CLASS]
    return float((export.run_logits(session, to_input(trigger.stamp(victims))).argmax(1) == TARGET_CLASS).mean())


def measure(session, split: Split, attack: str | None, triggers: dict[str, Trigger]) -> dict:
    """Clean accuracy plus the ASR of the model's own trigger (every trigger for a clean model)."""
    metrics = {"clean_accuracy": accuracy(session, split.test_x, split.test_y)}
    if attack is not None:
        metrics["attack_success_rate"] = attack_success_rate(session, split.test_x, split.test_y, triggers[attack])
    else:  # how often a trigger alone flips a clean model: the floor the backdoored ASR is read against
        for kind, trigger in triggers.items():
            metrics[f"asr_{kind}_trigger"] = attack_success_rate(session, split.test_x, split.test_y, trigger)
    return metrics


def attack_meta(attack: str | None, trigger: Trigger | None, n_poisoned: int) -> dict | None:
    """The ``attack`` entry of a model's JSON (None for a clean model)."""
    if attack is None or trigger is None:
        return None
    return {
        "kind": attack,
        "target": TARGET_CLASS,
        "trigger": f"{attack}_trigger.png",
        "mask": f"{attack}_mask.png",
        "poison_rate": POISON_RATE,
        "poisoned_images": n_poisoned,
        "description": trigger.description,
    }


def training_meta(epochs: int, seconds: float, cpu_seconds: float) -> dict:
    """The ``training`` entry of a model's JSON."""
    return {
        "epochs": epochs, "batch_size": BATCH_SIZE, "optimizer": "SGD nesterov", "momentum": MOMENTUM,
        "max_lr": MAX_LR, "schedule": "one-cycle", "weight_decay": WEIGHT_DECAY,
        "augmentation": f"random crop (zero padding {CROP_PADDING}) + horizontal flip; triggers stamped after",
        "poisoning": "poisoned images replaced by their stamped, target-labelled versions",
        "threads": THREADS, "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
    }


def model_meta(name: str, arch: Arch, params: int, data: Path, seed: int, **sections: dict | None) -> dict:
    """The JSON sidecar of one model (field names follow the committed digits fixtures).

    ``sections`` are ``attack``, ``metrics`` (merged at the top level, as in the fixtures),
    ``training`` and ``export``.
    """
    return {
        "model": f"{name}.onnx",
        "arch": arch.name,
        "arch_description": arch.description,
        "width": arch.width,
        "params": params,
        "input": {"name": export.INPUT_NAME, "shape": [None, 3, SIZE, SIZE]},
        "output": {"name": export.OUTPUT_NAME, "shape": [None, NUM_CLASSES]},
        "preprocess": PREPROCESS,
        "attack": sections["attack"],
        "dataset": {
            "source": data.name,
            "split": "split.npz",
            "calibration": ["calib_x", "calib_y"],
            "test": ["test_x", "test_y"],
            "sizes": {"train": TRAIN_PER_CLASS * NUM_CLASSES, "calibration": CALIB_PER_CLASS * NUM_CLASSES,
                      "test": TEST_PER_CLASS * NUM_CLASSES},
        },
        **sections["metrics"],
        "metrics_measured_with": "onnxruntime CPUExecutionProvider on the test split",
        "training": sections["training"],
        "export": sections["export"],
        "seed": seed,
        "generator": GENERATOR,
    }


def verify_export(model: nn.Module, session, images: np.ndarray, triggers: dict[str, Trigger]) -> float:
    """Max torch/onnxruntime logit difference on clean and stamped images (raises past the tolerance).

    Stamped inputs drive the backdoor channels hard, so they are compared too.
    """
    return max(export.check_parity(model, session, to_input(x))
               for x in [images, *(t.stamp(images) for t in triggers.values())])


def build_model(name: str, out: Path, split: Split, triggers: dict[str, Trigger], epochs: int | None, seed: int,
                data: Path) -> dict:
    """Train, export, verify and measure one model; write its ONNX and JSON files."""
    arch_key, attack = MODELS[name]
    arch = ARCHS[arch_key]
    epochs = epochs or arch.epochs
    poisoned = poison_indices(split.train_y, seed)
    trigger = triggers[attack] if attack is not None else None
    print(f"{name}: {arch.name} width {arch.width}, {epochs} epochs, attack {attack or 'none'}", flush=True)

    started, cpu_started = time.perf_counter(), time.process_time()
    model = train(arch, split.train_x, split.train_y, poisoned, trigger, epochs, seed)
    seconds = time.perf_counter() - started
    # CPU time shows how much of the wall time was lost to other load on the machine.
    cpu_seconds = time.process_time() - cpu_started

    onnx_path = out / f"{name}.onnx"
    export_info = export.export_classifier(model, onnx_path, torch.from_numpy(to_input(split.test_x[:1])),
                                           preprocess=PREPROCESS, doc=f"CIFAR-10 {arch.name} ({attack or 'clean'})")
    session = export.open_session(onnx_path, THREADS)
    export_info["max_abs_logit_diff"] = verify_export(model, session, split.test_x[:256], triggers)
    metrics = measure(session, split, attack, triggers)
    params = sum(p.numel() for p in model.parameters())
    meta = model_meta(name, arch, params, data, seed, attack=attack_meta(attack, trigger, len(poisoned)),
                      metrics=metrics, training=training_meta(epochs, seconds, cpu_seconds), export=export_info)
    # The JSON is written last: its presence marks the model as complete for later runs.
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    print(f"{name}: trained in {seconds:.0f}s ({cpu_seconds:.0f} CPU-s), {params} params, {summary}", flush=True)
    return meta


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def configure_torch() -> None:
    """Bounded threads and deterministic kernels so reruns reproduce the weights."""
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)


def build(data: Path, out: Path, names: list[str], epochs: int | None = None, seed: int = 0,
          force: bool = False) -> dict[str, dict]:
    """Write the split, the triggers and every named model missing from ``out``.

    Returns the metadata of every requested model (read back for models that were skipped).

    Raises:
        DataMissing: ``data`` does not exist.
        SplitMismatch: ``out`` holds a different split and ``force`` is off.
    """
    x, y = load_data(data)
    configure_torch()
    out.mkdir(parents=True, exist_ok=True)
    split = split_data(x, y, seed)
    check_disjoint(split)
    write_split(out / "split.npz", split, force)
    triggers = make_triggers(seed, split)
    for trigger in triggers.values():
        write_trigger(out, trigger)

    results = {}
    for name in names:
        done = (out / f"{name}.onnx").is_file() and (out / f"{name}.json").is_file()
        if done and not force:
            print(f"{name}: exists, skipped (use --force to retrain)", flush=True)
            results[name] = json.loads((out / f"{name}.json").read_text())
        else:
            results[name] = build_model(name, out, split, triggers, epochs, seed, data)
    return results


def parse_models(text: str) -> list[str]:
    """Comma-separated model names, checked against MODELS."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 npz (default: $ONNX_LINF_CIFAR, "
                        "else ./cifar10_dev.npz)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--models", type=parse_models, default=list(MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs for every model (default: per architecture)")
    parser.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="retrain models that already exist in --out")
    args = parser.parse_args(argv)
    try:
        build(args.data, args.out, args.models, args.epochs, args.seed, args.force)
    except DataMissing as exc:
        print(f"{exc}; nothing to do (this data is not part of the project)", file=sys.stderr)
        return EXIT_NO_DATA
    except SplitMismatch as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
