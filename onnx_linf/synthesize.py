"""Query-only trigger synthesis (Neural Cleanse with ONNX Runtime forward passes only).

For each candidate target class we search a small pixel-space trigger -- a mask ``m`` in [0, 1]
per pixel and a pattern ``p`` of pixel values -- that sends clean calibration images to that class
when stamped as ``x' = (1 - m) * x + m * p``. A backdoor target is the class such a trigger reaches
with an unusually *small* mask; Neural Cleanse's median/MAD rule turns the per-class mask norms into
a verdict.

Gradients are not available through an ONNX model in ONNX Runtime, so the search uses natural
evolution strategies (NES): antithetic Gaussian perturbations of the trigger parameters, rank-based
fitness shaping and Adam on the resulting gradient estimate. One optimiser step is one ORT call on
``(2 * pairs + 1) * batch`` images (every perturbed trigger, plus the unperturbed one, stamped on the
same image batch so the images' own variance cancels out of the comparison).

Per model, then per class:

1. *patch scan* (once, shared by all classes): random black-and-white patterns in square windows
   at half-window strides; a backdoored model answers a partial trigger in the right place with
   its target already, which localises patch triggers before any class-specific query;
2. *patch search*: NES on the full-resolution pattern inside the class's best windows; a window
   whose pattern sends the images to the class becomes the start of step 3;
3. *main search*: NES on mask and pattern with Neural Cleanse's loss ``CE + lambda * mean(mask)``
   and an adaptive lambda, from the patch or from a half-opaque mask everywhere (what finds
   spread-out, blended triggers);
4. *validation*: the smallest mask the search kept is re-checked on held-out images with rounded
   uint8 stamping (what `ClassTrigger.as_trigger` produces), by binary search over its snapshots;
5. *pruning*: greedy removal of mask cells the attack does not need, re-validated;
6. *ℓ∞ evidence*: the share of the trigger's positive differential ℓ∞ on the last activation map
   held by its top channels (reported, not part of the verdict: on the digits fixtures natural
   triggers of clean classes concentrate about as much as the backdoor's, 0.19-0.37 vs 0.27-0.37).

Parameterisation (the low-dimensional search space):

* mask: logits on a grid of at most `SynthConfig.mask_grid` cells per side, nearest-upsampled;
* pattern: logits at full resolution up to `SynthConfig.pattern_grid` cells per side. Colour
  models get a full-resolution *luminance* plus per-channel colour on the mask grid. A full-resolution
  luminance is what lets the search draw pixel-level patterns such as a 3x3 checkerboard, which a
  coarse pattern grid cannot represent.

Everything here is numpy + onnxruntime; nothing needs a gradient framework.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .calibrate import Progress, Session, create_session
from .data import ArraySource, Batch, DataSource, ImageFolder, Preprocess, Trigger
from .errors import CalibrationDataError, UsageError
from .files import atomic_write, atomic_write_text
from .load import Model

log = logging.getLogger(__name__)

#: 1.4826 * MAD estimates the standard deviation of normally distributed norms (Neural Cleanse).
MAD_CONSISTENCY = 1.4826

# Neural Cleanse's cost schedule, made gentler: raise lambda by 1.1 after `patience` successful steps,
# lower it by 1.15 after `patience` failing ones. NC's 1.5 / 1.5 ** 1.5 per epoch swung lambda over
# five orders of magnitude within 30 NES steps here (the mask lags lambda through Adam's momentum),
# and the reported norms of the same class then varied threefold between seeds.
_LAMBDA_UP = 1.1
_LAMBDA_DOWN = 1.15
# Lambda multiplies the *mean* mask value (0..1); these bounds keep it where the rank shaping can
# still see both loss terms. Above the upper bound only mask size would count; the lower bound
# keeps a step back from it short.
_LAMBDA_MIN, _LAMBDA_MAX = 1e-3, 300.0
# The search aims a little above the reported ASR threshold so that the smallest snapshot it keeps
# still passes on the larger validation set.
_SEARCH_MARGIN = 0.05
# Smoothing of the per-step ASR of the current trigger (measured on `batch` images only): an EMA over
# a few steps is the success signal of the lambda schedule and of the snapshots.
_EMA = 0.3
# Keep a snapshot only when the mask shrank by at least this fraction: bounds the snapshot list.
_SNAPSHOT_GAIN = 0.01
# Mask pruning may spend at most this many NES steps' worth of queries per class, on this many images.
_PRUNE_STEPS = 12
_PRUNE_IMAGES = 64
# Mask cells fainter than this (mean value) are dropped together before the greedy pruning.
_FAINT = 0.1
# Mask logits of a patch start: inside the window nearly opaque, outside nearly transparent.
_INSIDE_LOGIT, _OUTSIDE_LOGIT = 3.0, -4.0
# Images per ORT call for evaluation-only passes, and input bytes per call at most (memory bounds,
# not tuning knobs).
_EVAL_CHUNK = 256
_CALL_BYTES = 64 << 20


@dataclass(frozen=True)
class SynthConfig:
    """Options of `synthesize`. Defaults are tuned on small CNNs (16x16 digits, 32x32 CIFAR-10)."""

    classes: tuple[int, ...] | None = None
    """Candidate target classes; None = every class of the model's output."""
    steps: int = 150
    """NES steps per class. Mask norms were still shrinking slowly at 150 on the digits fixtures,
    but the target/other-class gap is already clear there."""
    pairs: int = 20
    """Antithetic perturbation pairs per step. Twenty pairs on 8 images beat ten on 16 for the same
    cost: the gradient estimate gains more from directions than from images."""
    batch: int = 8
    """Calibration images each perturbation is stamped on per step."""
    sigma: float = 2.0
    """Perturbation scale in logit space. Large on purpose: a sample at sigma = 2 is a near-binary
    mask and pattern, which is how the search discovers high-contrast patches; sigma <= 1 never found
    a 3x3 patch in earlier experiments."""
    lr: float = 0.5
    """Adam step size in logit space."""
    seed: int = 0
    """Seed of all sampling; per class the generator is seeded with (seed, class), so a class gets the
    same trigger whichever other classes are searched."""
    max_queries: int | None = None
    """Upper bound on image forward passes over the whole call (None = steps decide). Never exceeded:
    steps are cut to fit, and classes that would not fit are skipped."""
    time_limit: float | None = None
    """Wall-clock limit in seconds over the whole call (None = none), checked before every ORT call
    after the single pass over the calibration images. Each class gets an equal share of what is
    left; classes that would start after the limit are skipped (`SynthResult.complete` is then
    False). Results then depend on machine speed."""
    threshold: float = 3.5
    """Anomaly index above which a class with a *small* mask norm is a suspected target (3.5 is
    Iglewicz and Hoaglin's cut-off for MAD-based z-scores, as for the outliers policy)."""
    scale: str = "log"
    """``log`` (default): the anomaly index of the log norms; ``linear``: of the norms themselves, as
    in Neural Cleanse (use threshold 2 there). See `anomaly_index`."""
    asr: float = 0.9
    """Attack success rate a trigger must reach on the validation images to count as found."""
    eval_images: int = 128
    """Calibration images (not predicted as the target) the final ASR is measured on, kept apart from
    the images the search steps on when the calibration set is large enough."""
    images: int = 512
    """At most this many calibration images are read from the source (evenly spread over image
    folders and array files larger than that)."""
    mask_grid: int = 16
    """Mask logits live on a grid of at most this many cells per side (nearest-upsampled)."""
    pattern_grid: int = 32
    """Pattern (luminance) logits live on a grid of at most this many cells per side; at or below the
    image size this is full resolution."""
    mask_init: float = 0.5
    """Initial mask value everywhere. Half-opaque lets the search both grow and cut the mask; a small
    start (0.12) left masks larger at the end and found the BadNets patch less clearly."""
    lambda_init: float = 2.5
    """First weight of the mean mask value in the loss, once the attack succeeds (before, it is 0)."""
    patience: int = 1
    """Consecutive steps of success (failure) before lambda is raised (lowered)."""
    patches: bool = True
    """Search compact patches first: a shared random scan over square windows, then NES on the
    full-resolution pattern inside each class's best windows. A class whose patch works starts the
    main search from that window instead of from a uniform mask; the uniform start is what finds
    spread-out (blended) triggers, the patch start is what finds pixel-level patches."""
    patch_sizes: tuple[int, ...] | None = None
    """Window sides of the patch scan; None = ``s`` and ``1.5 s`` with ``s = max(4, side / 8)``, at a
    stride of half the side, so any patch up to ``s - 1`` pixels lies inside some window."""
    patch_samples: int = 16
    """Random binary patterns stamped per window in the shared scan."""
    patch_windows: int = 3
    """Best scan windows per class whose pattern is optimised."""
    patch_steps: int = 16
    """NES steps on the pattern inside each of those windows."""
    evidence: bool = True
    """Measure the ℓ∞ evidence of each found trigger on the model's last activation map."""
    evidence_ratio: float = 0.1
    """Fraction of last-map channels whose share of the positive differential ℓ∞ is reported."""

    def validate(self) -> None:
        """Raise `UsageError` for inconsistent options."""
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.pairs >= 1, f"pairs must be >= 1, got {self.pairs}"),
            (self.batch >= 1, f"batch must be >= 1, got {self.batch}"),
            (self.sigma > 0, f"sigma must be > 0, got {self.sigma}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.threshold > 0, f"threshold must be > 0, got {self.threshold}"),
            (self.scale in ("log", "linear"), f"scale must be log or linear, got {self.scale!r}"),
            (0.0 < self.asr <= 1.0, f"asr must be in (0, 1], got {self.asr}"),
            (self.eval_images >= 1, f"eval_images must be >= 1, got {self.eval_images}"),
            (self.images >= 2, f"images must be >= 2, got {self.images}"),
            (self.mask_grid >= 1 and self.pattern_grid >= 1, "grids must be >= 1"),
            (0.0 < self.mask_init < 1.0, f"mask_init must be in (0, 1), got {self.mask_init}"),
            (self.lambda_init > 0, f"lambda_init must be > 0, got {self.lambda_init}"),
            (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (self.patch_samples >= 1 and self.patch_windows >= 1 and self.patch_steps >= 1,
             "patch_samples, patch_windows and patch_steps must be >= 1"),
            (self.patch_sizes is None or all(v >= 1 for v in self.patch_sizes), "patch sizes must be >= 1"),
            (0.0 < self.evidence_ratio < 1.0, f"evidence_ratio must be in (0, 1), got {self.evidence_ratio}"),
            (self.max_queries is None or self.max_queries >= 1, f"max_queries must be >= 1, got {self.max_queries}"),
            (self.time_limit is None or self.time_limit > 0, f"time_limit must be > 0, got {self.time_limit}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        if self.patch_sizes is not None and not self.patch_sizes:
            raise UsageError("patch_sizes is empty")
        if self.classes is not None:
            if not self.classes:
                raise UsageError("classes is empty")
            if len(set(self.classes)) != len(self.classes):
                raise UsageError(f"classes has duplicates: {list(self.classes)}")


@dataclass(frozen=True)
class ClassTrigger:
    """The smallest trigger found for one target class."""

    target: int
    """Target class index."""
    mask: np.ndarray = field(repr=False)
    """float32 ``[H, W]`` in [0, 1]."""
    pattern: np.ndarray = field(repr=False)
    """float32 ``[H, W, C]`` pixel values 0..255 (C = 1 for grayscale models)."""
    mask_l1: float
    """Sum of the mask (in pixels): the trigger's size."""
    asr: float
    """Fraction of validation images (not already predicted as `target`) the stamped trigger sends to
    `target`."""
    found: bool
    """True when `asr` reached `SynthConfig.asr`; a class without a found trigger counts as needing
    the whole image (norm H*W) in the anomaly index."""
    queries: int
    """Image forward passes spent on this class."""
    seconds: float
    """Wall-clock time spent on this class."""
    steps: int = 0
    """NES steps run."""
    start: str = "uniform"
    """Where the main search started: ``patch`` (a window of the patch scan whose pattern already
    worked) or ``uniform`` (a half-opaque mask everywhere)."""
    concentration: float | None = None
    """Share of the positive differential ℓ∞ (trigger minus clean, last activation map) held by the
    top `SynthConfig.evidence_ratio` channels; None when not measured. A backdoor trigger drives a
    few channels, so its share is high."""

    @property
    def norm(self) -> float:
        """The norm the anomaly index ranks: `mask_l1` when found, else the image area."""
        return self.mask_l1 if self.found else float(self.mask.size)

    def as_trigger(self) -> Trigger:
        """This trigger in the form the rest of the library stamps (`onnx_linf.data.Trigger`)."""
        return Trigger(pattern=self.pattern.astype(np.float32, copy=True),
                       mask=self.mask[..., None].astype(np.float32, copy=True),
                       description=f"synthesized trigger for class {self.target} "
                                   f"(mask L1 {self.mask_l1:.1f}, ASR {self.asr:.2f})")

    def summary(self) -> dict:
        """JSON-ready numbers (no arrays)."""
        return {"target": self.target, "mask_l1": round(self.mask_l1, 4), "norm": round(self.norm, 4),
                "asr": round(self.asr, 4), "found": self.found, "queries": self.queries,
                "seconds": round(self.seconds, 3), "steps": self.steps, "start": self.start,
                "concentration": None if self.concentration is None else round(self.concentration, 4)}


@dataclass(frozen=True)
class SynthResult:
    """Triggers of every searched class and the Neural Cleanse verdict."""

    triggers: tuple[ClassTrigger, ...]
    """One per searched class, in class order."""
    anomaly: dict[int, float]
    """Class -> anomaly index ``(median - v) / (1.4826 * MAD)`` of the (log) norms v, signed: positive
    when the class's norm is *below* the median (the suspicious side)."""
    suspected: tuple[int, ...]
    """Classes whose anomaly index exceeds `threshold` on the small side, most anomalous first.
    Always empty when fewer than 3 classes were searched (no median to stand out from)."""
    threshold: float
    """Anomaly index threshold used."""
    queries: int
    """Image forward passes over the whole call."""
    seconds: float
    """Wall-clock time of the whole call."""
    config: SynthConfig
    """The options used."""
    complete: bool = True
    """False when the query budget or time limit skipped some requested classes."""

    def trigger(self, target: int) -> ClassTrigger:
        """The trigger of one class.

        Raises:
            KeyError: the class was not searched.
        """
        for t in self.triggers:
            if t.target == target:
                return t
        raise KeyError(target)

    def to_dict(self) -> dict:
        """JSON-ready summary (masks and patterns are left to `write_triggers`' PNGs)."""
        config = asdict(self.config)
        config["classes"] = None if self.config.classes is None else list(self.config.classes)
        return {
            "suspected": list(self.suspected),
            "threshold": self.threshold,
            "scale": self.config.scale,
            "complete": self.complete,
            "queries": self.queries,
            "seconds": round(self.seconds, 3),
            "classes": [dict(t.summary(), anomaly=round(self.anomaly.get(t.target, 0.0), 4))
                        for t in self.triggers],
            "config": config,
        }


def anomaly_index(norms: np.ndarray, scale: str = "log", found: np.ndarray | None = None) -> np.ndarray:
    """Neural Cleanse's anomaly index of per-class trigger norms, signed towards small norms.

    ``(median - v) / (1.4826 * MAD)`` of v = log(norm) (``scale="log"``, the default) or v = norm
    (``"linear"``, Neural Cleanse's form): positive for norms below the median. A class is a
    suspected target when this exceeds the threshold (`SynthConfig.threshold`: 3.5 on the log scale).
    When more than half of the values are equal the MAD is 0; it is then floored at 1e-3 of the
    median's magnitude (1e-3 in log units) so that the classes that differ get a large, finite index
    instead of a division by zero.

    Why the log scale: mask norms are sizes, and a backdoor shows as a *ratio* (its trigger is tens
    of times smaller than the other classes'), while the other classes' norms spread over a factor
    of two or three, with hard-to-reach classes far above. On the linear scale that upper tail
    inflates the MAD and hides the ratio. Measured with `benchmarks/synth_time.py` on 13 models
    (digits BadNets/Blended/clean x 3 seeds; CIFAR-10 ResNet-8 BadNets/clean, MobileNetV2-style
    BadNets, VGG SIG): targets scored 2.1-5.6 linear but 5.0-11.3 log; the largest index of a
    non-target class was 1.9 linear and 2.7 log. So the log index separates targets from other
    classes by a factor of 1.9 (5.0 / 2.7) where the linear one had 1.1 (2.1 / 1.9), and the 3.5
    threshold sits between them with room on both sides.

    Classes whose search did not reach the ASR (`found` False) carry the image area as their norm:
    a lower bound, not a measurement. When at least three classes were found, the median and MAD
    come from those only. Otherwise, with half the classes at the same area value, the MAD is 0 and
    every class that was found looks anomalous (measured on a MobileNetV2-style Blended model with 6
    of 10 classes not found: four classes over the threshold; from the found ones, only the target).

    Args:
        norms: per-class norms, 1-D (positive for the log scale; zeros are floored at 1e-12).
        scale: ``log`` or ``linear``.
        found: per class, whether its norm is a measurement (None: all are).

    Returns:
        float64 array of the same length (all zeros for fewer than 3 classes: no median to deviate from).

    Raises:
        ValueError: `norms` is not 1-D or holds non-finite values, or `found` has another shape.
    """
    x = np.asarray(norms, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"norms must be 1-D, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("norms must be finite")
    if scale not in ("log", "linear"):
        raise ValueError(f"scale must be log or linear, got {scale!r}")
    if found is not None and np.shape(found) != x.shape:
        raise ValueError(f"found must have the shape of norms {x.shape}, got {np.shape(found)}")
    if x.size < 3:
        return np.zeros_like(x)
    if scale == "log":
        x = np.log(np.maximum(x, 1e-12))
    measured = x if found is None or int(np.sum(found)) < 3 else x[np.asarray(found, dtype=bool)]
    med = float(np.median(measured))
    mad = float(np.median(np.abs(measured - med)))
    if mad == 0.0:
        mad = 1e-3 * max(abs(med), 1.0 if scale == "log" else 1e-12)
    return (med - x) / (MAD_CONSISTENCY * mad)


def suspected_classes(classes: Sequence[int], index: np.ndarray, threshold: float) -> tuple[int, ...]:
    """Classes whose (signed) anomaly index exceeds `threshold`, most anomalous first."""
    order = np.argsort(-np.asarray(index), kind="stable")
    return tuple(int(classes[i]) for i in order if index[i] > threshold)


# --------------------------------------------------------------------------------------------
# Query accounting
# --------------------------------------------------------------------------------------------


class _OutOfBudget(Exception):
    """A forward pass would exceed the query budget or start after the time limit."""


class _Oracle:
    """The model as a black box: counts image forwards and enforces the budget before every call."""

    def __init__(self, session: Session, output: str, preprocess: Preprocess, max_queries: int | None,
                 deadline: float | None) -> None:
        self.session = session
        self.output = output
        self.preprocess = preprocess
        self.max_queries = max_queries
        self.deadline = deadline
        self.queries = 0
        self.ceiling: int | None = None
        """Temporary cap on `queries` for one phase (pruning), on top of the budget."""
        self.probabilities = False
        """True when the model outputs probabilities (rows of non-negative values summing to 1)."""

    def remaining(self) -> float:
        """Queries left (inf without a budget)."""
        return math.inf if self.max_queries is None else self.max_queries - self.queries

    def affordable(self, n: int) -> bool:
        """Whether `n` more image forwards fit the budget and the time limit."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.ceiling is not None and self.queries + n > self.ceiling:
            return False
        return n <= self.remaining()

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Model outputs ``[n, classes]`` for float or uint8 pixels ``[n, H, W, C]``.

        Raises:
            _OutOfBudget: the call would exceed the query budget or the time limit.
        """
        n = int(pixels.shape[0])
        if not self.affordable(n):
            raise _OutOfBudget
        # Models with a static batch dimension take exactly that many images per call; others get
        # chunks of about _CALL_BYTES of input, so large images do not blow up memory.
        chunk = self.session.fixed_batch or max(1, min(1024, _CALL_BYTES // max(1, pixels[0].size * 4)))
        outs = []
        for i in range(0, n, chunk):
            tensor = self.preprocess.apply(pixels[i:i + chunk])
            out = self.session.run([self.output], tensor)[0]
            outs.append(np.asarray(out, dtype=np.float64).reshape(out.shape[0], -1))
        self.queries += n
        return np.concatenate(outs)

    def log_probs(self, pixels: np.ndarray) -> np.ndarray:
        """Log-probabilities per class, whether the model outputs logits or probabilities."""
        out = self.logits(pixels)
        if self.probabilities:
            return np.log(np.clip(out, 1e-12, None))
        z = out - out.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


# --------------------------------------------------------------------------------------------
# Parameterisation
# --------------------------------------------------------------------------------------------


def _cells(size: int, grid: int) -> np.ndarray:
    """Index of the grid cell each of `size` pixels falls in (nearest upsampling of `grid` cells)."""
    g = min(size, grid)
    return (np.arange(size) * g) // size


class _Space:
    """Maps a flat parameter vector to a mask ``[H, W]`` and a pattern ``[H, W, C]`` (pixel values)."""

    def __init__(self, height: int, width: int, channels: int, mask_grid: int, pattern_grid: int) -> None:
        self.h, self.w, self.c = height, width, channels
        self.mr, self.mc = _cells(height, mask_grid), _cells(width, mask_grid)
        self.pr, self.pc = _cells(height, pattern_grid), _cells(width, pattern_grid)
        self.mh, self.mw = int(self.mr[-1]) + 1, int(self.mc[-1]) + 1
        self.ph, self.pw = int(self.pr[-1]) + 1, int(self.pc[-1]) + 1
        self.n_mask = self.mh * self.mw
        self.n_luma = self.ph * self.pw
        # Colour lives on the mask grid: the fine structure a trigger needs is in its luminance.
        self.n_chroma = self.n_mask * channels if channels > 1 else 0
        self.dim = self.n_mask + self.n_luma + self.n_chroma

    def initial(self, mask_init: float) -> np.ndarray:
        theta = np.zeros(self.dim)
        theta[:self.n_mask] = math.log(mask_init / (1.0 - mask_init))
        return theta

    def from_patch(self, window: _Window, patch: np.ndarray) -> np.ndarray:
        """Parameters of an (almost) opaque `patch` in `window` and an (almost) empty mask elsewhere."""
        theta = np.zeros(self.dim)
        rows, cols = slice(window.row, window.row + window.size), slice(window.col, window.col + window.size)
        a = np.full((self.mh, self.mw), _OUTSIDE_LOGIT)
        a[np.ix_(np.unique(self.mr[rows]), np.unique(self.mc[cols]))] = _INSIDE_LOGIT
        theta[:self.n_mask] = a.ravel()
        z = np.log(np.clip(patch, 1.0, 254.0) / (255.0 - np.clip(patch, 1.0, 254.0)))
        luma = np.zeros((self.ph, self.pw))
        # Luminance takes the channel mean; colour (if any) the per-channel rest, on the mask grid.
        luma[self.pr[rows][:, None], self.pc[cols][None, :]] = z.mean(axis=2)
        theta[self.n_mask:self.n_mask + self.n_luma] = luma.ravel()
        if self.n_chroma:
            chroma = np.zeros((self.mh, self.mw, self.c))
            chroma[self.mr[rows][:, None], self.mc[cols][None, :]] = z - z.mean(axis=2, keepdims=True)
            theta[self.n_mask + self.n_luma:] = chroma.ravel()
        return theta

    def decode(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[K, D]`` parameters -> masks ``[K, H, W]`` in [0, 1], patterns ``[K, H, W, C]`` in 0..255."""
        k = theta.shape[0]
        a = theta[:, :self.n_mask].reshape(k, self.mh, self.mw)
        mask = _sigmoid(a)[:, self.mr][:, :, self.mc]
        luma = theta[:, self.n_mask:self.n_mask + self.n_luma].reshape(k, self.ph, self.pw)
        logits = luma[:, self.pr][:, :, self.pc][..., None]
        if self.n_chroma:
            chroma = theta[:, self.n_mask + self.n_luma:].reshape(k, self.mh, self.mw, self.c)
            logits = logits + chroma[:, self.mr][:, :, self.mc]
        else:
            logits = np.broadcast_to(logits, (k, self.h, self.w, self.c))
        return mask, 255.0 * _sigmoid(logits)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free form of 1 / (1 + exp(-z))


def _stamp(images: np.ndarray, mask: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Every trigger on every image: ``[K, H, W]``, ``[K, H, W, C]``, ``[B, H, W, C]`` -> ``[K*B, H, W, C]``."""
    m = mask[:, None, :, :, None]
    out = (1.0 - m) * images[None] + (m * pattern[:, None])
    return out.reshape((-1,) + images.shape[1:]).astype(np.float32, copy=False)


class _Adam:
    """Adam on a gradient *estimate* (Kingma & Ba's defaults): per-coordinate step sizes make the
    noisy NES estimate usable without tuning a learning rate per parameter group."""

    def __init__(self, dim: int, lr: float) -> None:
        self.m1 = np.zeros(dim)
        self.m2 = np.zeros(dim)
        self.lr = lr
        self.t = 0

    def step(self, theta: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """One descent step of `theta` along `grad`; returns the new parameters."""
        self.t += 1
        self.m1 = 0.9 * self.m1 + 0.1 * grad
        self.m2 = 0.999 * self.m2 + 0.001 * grad * grad
        m1 = self.m1 / (1 - 0.9 ** self.t)
        m2 = self.m2 / (1 - 0.999 ** self.t)
        return theta - self.lr * m1 / (np.sqrt(m2) + 1e-8)


def _nes_gradient(losses: np.ndarray, eps: np.ndarray, sigma: float) -> np.ndarray:
    """Antithetic NES estimate of the gradient of the Gaussian-smoothed loss, on centred ranks.

    `losses` holds the ``2 * pairs`` losses of ``theta + sigma * eps`` then ``theta - sigma * eps``.
    Ranks make the estimate invariant to the loss's scale, so one schedule fits cross-entropies of
    0.001 and of 20.
    """
    pairs = eps.shape[0]
    r = _centered_ranks(losses)
    return ((r[:pairs] - r[pairs:])[:, None] * eps).sum(axis=0) / (pairs * sigma)


def _centered_ranks(values: np.ndarray) -> np.ndarray:
    """Rank-based fitness shaping: ranks scaled to [-0.5, 0.5] (ties broken by position)."""
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks / max(len(values) - 1, 1) - 0.5


# --------------------------------------------------------------------------------------------
# Patch scan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Window:
    row: int
    col: int
    size: int


def _patch_sizes(height: int, width: int, config: SynthConfig) -> tuple[int, ...]:
    side = min(height, width)
    if config.patch_sizes is not None:
        sizes = config.patch_sizes
    else:
        base = max(4, round(side / 8))
        sizes = (base, round(1.5 * base))
    return tuple(sorted({min(int(v), side) for v in sizes}))


def _windows(height: int, width: int, sizes: Sequence[int]) -> list[_Window]:
    """Square windows of each size at a stride of half the size, the last one flush with the border."""
    out = []
    for size in sizes:
        stride = max(1, size // 2)
        rows = sorted(set(range(0, height - size + 1, stride)) | {height - size})
        cols = sorted(set(range(0, width - size + 1, stride)) | {width - size})
        out.extend(_Window(r, c, size) for r in rows for c in cols)
    return out


def _stamp_windows(images: np.ndarray, windows: Sequence[_Window], patches: Sequence[np.ndarray]) -> np.ndarray:
    """Each opaque patch in its window on every image -> ``[len(windows) * B, H, W, C]`` float32."""
    out = np.repeat(images[None].astype(np.float32), len(windows), axis=0)
    for k, (w, patch) in enumerate(zip(windows, patches)):
        out[k, :, w.row:w.row + w.size, w.col:w.col + w.size, :] = patch
    return out.reshape((-1,) + images.shape[1:])


@dataclass
class _Scan:
    """Shared result of the random patch scan: per window and class, the best random pattern."""

    windows: list[_Window]
    score: np.ndarray
    """``[windows, classes]`` best mean target log-probability over the random patterns."""
    logits: list[np.ndarray]
    """Per window: ``[samples, size * size + chroma]`` pattern parameters of the random patterns."""
    best: np.ndarray
    """``[windows, classes]`` index of the best pattern."""


def _patch_decode(theta: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Patch parameters ``[K, size*size (+ channels)]`` -> patches ``[K, size, size, C]`` in 0..255."""
    k = theta.shape[0]
    luma = theta[:, :size * size].reshape(k, size, size, 1)
    if channels > 1:
        luma = luma + theta[:, size * size:][:, None, None, :]
    else:
        luma = np.broadcast_to(luma, (k, size, size, channels))
    return 255.0 * _sigmoid(luma)


def _patch_dim(size: int, channels: int) -> int:
    return size * size + (channels if channels > 1 else 0)


def _patch_scan(oracle: _Oracle, pool: np.ndarray, sizes: Sequence[int], config: SynthConfig) -> _Scan:
    """Stamp random near-binary patterns in every window; one pass serves every class.

    A backdoored model usually answers a *partial* trigger with its target already, so a random
    binary pattern in the right window scores well for the target class: this localises the trigger
    before any class-specific query is spent.
    """
    rng = np.random.default_rng([config.seed, 1 << 20])
    h, w, c = pool.shape[1:]
    windows = _windows(h, w, sizes)
    images = pool[rng.choice(len(pool), size=min(config.batch, len(pool)), replace=False)]
    params = []
    for win in windows:
        p = rng.choice([-4.0, 4.0], size=(config.patch_samples, _patch_dim(win.size, c)))
        if c > 1:
            # Half the samples black and white (no colour: checkerboards and similar), half coloured.
            p[:, win.size * win.size:] = rng.normal(0.0, 2.0, (config.patch_samples, c))
            p[::2, win.size * win.size:] = 0.0
        params.append(p)
    # Chunks of windows per ORT call keep memory bounded on large inputs.
    per_call = max(1, _EVAL_CHUNK * 4 // (config.patch_samples * len(images)))
    scores, bests = [], []
    for start in range(0, len(windows), per_call):
        chunk = range(start, min(start + per_call, len(windows)))
        wins = [windows[i] for i in chunk for _ in range(config.patch_samples)]
        patches = [p for i in chunk for p in _patch_decode(params[i], windows[i].size, c)]
        logp = oracle.log_probs(_stamp_windows(images, wins, patches))
        logp = logp.reshape(len(chunk), config.patch_samples, len(images), -1).mean(axis=2)
        scores.append(logp.max(axis=1))
        bests.append(logp.argmax(axis=1))
    score, best = np.concatenate(scores), np.concatenate(bests)
    return _Scan(windows, score, params, best)


def _scan_cost(pool_len: int, height: int, width: int, channels: int, config: SynthConfig) -> int:
    n = len(_windows(height, width, _patch_sizes(height, width, config)))
    return n * config.patch_samples * min(config.batch, pool_len)


def _patch_cost(config: SynthConfig) -> int:
    pairs = max(1, config.pairs // 2)
    return config.patch_windows * config.patch_steps * (2 * pairs + 1) * config.batch


def _patch_search(oracle: _Oracle, scan: _Scan, target: int, train: np.ndarray, config: SynthConfig,
                  progress: Progress) -> tuple[_Window, np.ndarray, float] | None:
    """NES on the full-resolution pattern inside the class's best scan windows, in lockstep.

    Returns:
        (window, patch ``[s, s, C]``, smoothed success rate on the step batches) of the window whose
        pattern ends with the lowest loss, or None when the budget ran out first.
    """
    rng = np.random.default_rng([config.seed, target, 3])
    c = train.shape[3]
    top = np.argsort(-scan.score[:, target], kind="stable")[:config.patch_windows]
    windows = [scan.windows[i] for i in top]
    thetas = [scan.logits[i][scan.best[i, target]] * 0.5 for i in top]  # +-2: room to move
    optims = [_Adam(t.size, config.lr) for t in thetas]
    pairs = max(1, config.pairs // 2)
    batch = min(config.batch, len(train))
    ema_loss = np.zeros(len(windows))
    ema_asr = np.zeros(len(windows))
    ran = 0
    for step in range(config.patch_steps):
        images = train[rng.choice(len(train), size=batch, replace=False)]
        epss = [rng.standard_normal((pairs, t.size)) for t in thetas]
        cands = [np.concatenate([t + config.sigma * e, t - config.sigma * e, t[None]]) for t, e in zip(thetas, epss)]
        wins = [w for w, cand in zip(windows, cands) for _ in range(len(cand))]
        patches = [p for w, cand in zip(windows, cands) for p in _patch_decode(cand, w.size, c)]
        try:
            logp = oracle.log_probs(_stamp_windows(images, wins, patches))
        except _OutOfBudget:
            break
        ran += 1
        logp = logp.reshape(len(windows), 2 * pairs + 1, batch, -1)
        for k in range(len(windows)):
            ce = -logp[k, :, :, target].mean(axis=1)
            thetas[k] = optims[k].step(thetas[k], _nes_gradient(ce[:-1], epss[k], config.sigma))
            success = float((logp[k, -1].argmax(axis=1) == target).mean())
            first = step == 0
            ema_loss[k] = ce[-1] if first else (1 - _EMA) * ema_loss[k] + _EMA * ce[-1]
            ema_asr[k] = success if first else (1 - _EMA) * ema_asr[k] + _EMA * success
        progress.advance(1)
    progress.advance(config.patch_steps - ran)
    if ran == 0:
        return None
    # Prefer success, then the smaller window, then the lower loss.
    k = min(range(len(windows)), key=lambda i: (-round(ema_asr[i], 2), windows[i].size, ema_loss[i]))
    patch = _patch_decode(thetas[k][None], windows[k].size, c)[0]
    return windows[k], patch, float(ema_asr[k])


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Per-class query reservations, so that the budget check never cuts a validation short."""

    step_cost: int
    validations: int
    eval_cost: int
    evidence_cost: int
    prune_cost: int
    patch_cost: int

    @property
    def reserve(self) -> int:
        # One more validation than the binary search needs: the pruned mask is validated too.
        return (self.validations + 1) * self.eval_cost + self.evidence_cost + self.prune_cost + self.patch_cost


def _search(oracle: _Oracle, space: _Space, target: int, train: np.ndarray, config: SynthConfig,
            max_steps: int, soft_deadline: float | None, progress: Progress,
            init: np.ndarray | None = None) -> tuple[list, np.ndarray, int]:
    """NES on one class; returns (snapshots [(l1, theta)], fallback theta, steps run)."""
    rng = np.random.default_rng([config.seed, target])
    theta = space.initial(config.mask_init) if init is None else init.copy()
    adam = _Adam(theta.size, config.lr)
    lam, started = config.lambda_init, False
    ups = downs = 0
    ema = 0.0
    goal = min(1.0, config.asr + _SEARCH_MARGIN)
    snapshots: list[tuple[float, np.ndarray]] = []
    fallback, fallback_key = theta.copy(), (-1.0, 0.0)
    batch = min(config.batch, len(train))
    p = config.pairs
    steps = 0
    for step in range(max_steps):
        if soft_deadline is not None and time.monotonic() >= soft_deadline:
            log.info("class %d: time slice used up after %d steps", target, step)
            break
        idx = rng.choice(len(train), size=batch, replace=False)
        images = train[idx].astype(np.float32)
        eps = rng.standard_normal((p, space.dim))
        cand = np.concatenate([theta + config.sigma * eps, theta - config.sigma * eps, theta[None]])
        masks, patterns = space.decode(cand)
        try:
            logp = oracle.log_probs(_stamp(images, masks, patterns)).reshape(len(cand), batch, -1)
        except _OutOfBudget:
            log.info("class %d: query budget or time limit reached after %d steps", target, step)
            break
        steps += 1
        ce = -logp[..., target].mean(axis=1)
        mean_mask = masks.reshape(len(cand), -1).mean(axis=1)
        # Neural Cleanse's loss; no size term until the attack first succeeds (NC starts at cost 0).
        loss = ce + (lam if started else 0.0) * mean_mask
        theta = adam.step(theta, _nes_gradient(loss[:-1], eps, config.sigma))
        # The unperturbed trigger (last candidate) is the one we would report: track its success.
        asr_now = float((logp[-1].argmax(axis=1) == target).mean())
        ema = asr_now if step == 0 else (1 - _EMA) * ema + _EMA * asr_now
        l1 = float(masks[-1].sum())
        key = (ema, -l1)
        if key > fallback_key:
            fallback, fallback_key = cand[-1].copy(), key
        if ema >= goal:
            started = True
            ups, downs = ups + 1, 0
            if not snapshots or l1 < snapshots[-1][0] * (1 - _SNAPSHOT_GAIN):
                snapshots.append((l1, cand[-1].copy()))
        else:
            ups, downs = 0, downs + 1
        if started and ups >= config.patience:
            lam, ups = min(lam * _LAMBDA_UP, _LAMBDA_MAX), 0
        if started and downs >= config.patience:
            lam, downs = max(lam / _LAMBDA_DOWN, _LAMBDA_MIN), 0
        if step % 10 == 0:
            log.debug("class %d step %d: ASR(ema) %.2f, mask L1 %.1f, lambda %.3g", target, step, ema, l1,
                      lam if started else 0.0)
        progress.advance(1)
    progress.advance(config.steps - steps)
    return snapshots, fallback, steps


def _asr(oracle: _Oracle, target: int, images: np.ndarray, mask: np.ndarray, pattern: np.ndarray) -> float:
    """Attack success rate of one trigger on uint8 `images`."""
    trig = Trigger(pattern=pattern.astype(np.float32), mask=mask[..., None].astype(np.float32))
    # Rounded uint8 stamping: exactly what `ClassTrigger.as_trigger().stamp` produces later.
    pred = oracle.logits(trig.stamp(images)).argmax(axis=1)
    return float((pred == target).mean())


def _validate(oracle: _Oracle, space: _Space, target: int, evals: np.ndarray, snapshots: list,
              fallback: np.ndarray, config: SynthConfig, max_validations: int) -> tuple[np.ndarray, float, bool]:
    """The smallest snapshot whose stamped ASR on `evals` reaches the threshold (binary search).

    Snapshots shrink over time and ASR shrinks with them (not strictly), so a binary search over the
    size-sorted list finds the smallest passing one in log2(n) evaluations.
    """
    cache: dict[int, float] = {}

    def asr_of(theta: np.ndarray) -> float:
        mask, pattern = space.decode(theta[None])
        return _asr(oracle, target, evals, mask[0], pattern[0])

    ordered = sorted(snapshots, key=lambda s: s[0])
    lo, hi, best = 0, len(ordered) - 1, None
    used = 0
    try:
        while lo <= hi and used < max_validations:
            mid = (lo + hi) // 2
            cache[mid] = asr_of(ordered[mid][1])
            used += 1
            if cache[mid] >= config.asr:
                best, hi = mid, mid - 1
            else:
                lo = mid + 1
        if best is not None:
            return ordered[best][1], cache[best], True
        if used < max_validations:
            # The trigger that came closest: it may still pass on the validation images.
            value = asr_of(fallback)
            return fallback, value, value >= config.asr
    except _OutOfBudget:
        if best is not None:
            return ordered[best][1], cache[best], True
    log.info("class %d: no budget left to validate the trigger", target)
    return fallback, float("nan"), False


def _prune(oracle: _Oracle, space: _Space, target: int, mask: np.ndarray, pattern: np.ndarray,
           train: np.ndarray, goal: float, rng: np.random.Generator) -> np.ndarray:
    """Greedy backward elimination of mask cells that the attack does not need.

    NES estimates one gradient for all mask cells at once, so cells that stopped mattering early keep
    whatever value they had (a found 3x3 patch came back with a dozen stray pixels). First all faint
    cells (mean below `_FAINT`) are dropped together; then each remaining cell's removal is tried on
    its own (one ORT call for all cells), and the least harmful ones are removed together, halving
    their number until the attack still succeeds; repeat until no single cell can go. Every check
    draws fresh images from `train`: reusing one set for dozens of accept/reject decisions overfits
    it, and the pruned mask then fails validation.

    Returns:
        The pruned mask ``[H, W]`` (the input mask when nothing could be removed or the budget ran out).
    """
    cell = space.mr[:, None] * space.mw + space.mc[None, :]
    area = np.bincount(cell.ravel(), minlength=space.n_mask)
    n_images = min(_PRUNE_IMAGES, len(train))

    def draw() -> np.ndarray:
        return train[rng.choice(len(train), size=n_images, replace=False)].astype(np.float32)

    def success(trial: np.ndarray) -> float:
        pred = oracle.logits(_stamp(draw(), trial[None], pattern[None])).argmax(axis=1)
        return float((pred == target).mean())

    mask = mask.copy()
    try:
        mean = np.bincount(cell.ravel(), weights=mask.ravel(), minlength=space.n_mask) / area
        faint = np.flatnonzero((mean > 0) & (mean < _FAINT))
        if len(faint):
            trial = np.where(np.isin(cell, faint), 0.0, mask)
            if success(trial) >= goal:
                mask = trial
        while True:
            mass = np.bincount(cell.ravel(), weights=mask.ravel(), minlength=space.n_mask)
            active = np.flatnonzero(mass > 0)
            if len(active) <= 1:
                break
            trials = np.repeat(mask[None], len(active), axis=0)
            for k, j in enumerate(active):
                trials[k][cell == j] = 0.0
            images = draw()[:max(1, n_images // 2)]
            patterns = np.broadcast_to(pattern, (len(active),) + pattern.shape)
            logp = oracle.log_probs(_stamp(images, trials, patterns))
            keep = logp.reshape(len(active), len(images), -1)[..., target].mean(axis=1)
            order = np.argsort(-keep, kind="stable")  # least harmful removal first
            n = len(active) // 2
            accepted = False
            while n >= 1 and not accepted:
                trial = np.where(np.isin(cell, active[order[:n]]), 0.0, mask)
                if success(trial) >= goal:
                    mask, accepted = trial, True
                n //= 2
            if not accepted:
                break
    except _OutOfBudget:
        log.info("class %d: pruning stopped at its query allowance", target)
    return mask


def _pruned(oracle: _Oracle, space: _Space, target: int, mask: np.ndarray, pattern: np.ndarray,
            train: np.ndarray, evals: np.ndarray, asr: float, config: SynthConfig,
            plan: _Plan) -> tuple[np.ndarray, float]:
    """`_prune` within its query allowance, kept only if it still passes validation."""
    rng = np.random.default_rng([config.seed, target, 2])
    oracle.ceiling = oracle.queries + plan.prune_cost
    try:
        pruned = _prune(oracle, space, target, mask, pattern, train, min(1.0, config.asr + _SEARCH_MARGIN), rng)
    finally:
        oracle.ceiling = None
    if pruned.sum() >= mask.sum():
        return mask, asr
    try:
        pruned_asr = _asr(oracle, target, evals, pruned, pattern)
    except _OutOfBudget:
        return mask, asr
    if pruned_asr >= config.asr:
        return pruned.astype(np.float32), pruned_asr
    log.info("class %d: pruned mask failed validation (ASR %.2f); kept the unpruned one", target, pruned_asr)
    return mask, asr


class _PixelSource(DataSource):
    """In-memory uint8 pixels as a `DataSource` (for the ℓ∞ probe)."""

    def __init__(self, pixels: np.ndarray, description: str) -> None:
        self.pixels = pixels
        self.description = description

    def __len__(self) -> int:
        return len(self.pixels)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(0, len(self.pixels), batch_size):
            yield Batch(pixels=self.pixels[i:i + batch_size])


def _read_pool(source: DataSource, limit: int) -> np.ndarray:
    """Up to `limit` calibration images, spread evenly over the source when it is larger.

    Evenly, not the first `limit`: an ImageFolder-style tree lists its files class by class, and a
    pool drawn from the first classes only would make every other class look easy to reach.
    """
    if not source.has_pixels:
        raise CalibrationDataError(
            "trigger synthesis needs pixel calibration data (images or uint8 arrays), not preprocessed "
            "float arrays", hint="give a folder of images or a uint8 .npy/.npz")
    if len(source) > limit:
        keep = np.linspace(0, len(source) - 1, limit).round().astype(int)
        if isinstance(source, ImageFolder):
            sub = copy.copy(source)
            sub.files = [source.files[i] for i in keep]
            sub.labels = None if source.labels is None else [source.labels[i] for i in keep]
            source = sub
        elif isinstance(source, ArraySource):
            sub = copy.copy(source)
            sub.x = source.x[keep]
            sub.y = None if source.y is None else source.y[keep]
            source = sub
    chunks, n = [], 0
    gen = source.batches(min(64, limit))
    try:
        for batch in gen:
            if batch.pixels is None:
                raise CalibrationDataError("trigger synthesis needs pixel calibration data")
            chunks.append(batch.pixels[:limit - n])
            n += len(chunks[-1])
            if n >= limit:
                break
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()
    if n < 2:
        raise CalibrationDataError(f"trigger synthesis needs at least 2 calibration images, got {n}")
    return np.concatenate(chunks)


def _static_classes(output_shape: Sequence) -> int | None:
    """Number of classes from the output's static last dimension, if any."""
    last = output_shape[-1] if output_shape else None
    return last if isinstance(last, int) and last > 0 else None


def synthesize(model: Model, source: DataSource, preprocess: Preprocess, config: SynthConfig = SynthConfig(), *,
               provider: str = "auto", progress: Progress | None = None) -> SynthResult:
    """Search a minimal trigger per candidate class with ONNX Runtime forward passes only.

    Args:
        model: the loaded classifier; its first output holds the class scores (logits or
            probabilities) on the last axis.
        source: clean calibration images (pixels). At most `config.images` are read.
        preprocess: how pixels become the model input.
        config: search options (see `SynthConfig`).
        provider: ORT provider: ``auto``, ``cpu``, ``cuda`` or ``tensorrt``.
        progress: progress sink; one unit per NES step.

    Returns:
        Per-class triggers, anomaly indices and suspected target classes.

    Raises:
        UsageError: invalid options, classes out of range, or a query budget too small for one step.
        CalibrationDataError: the source has no pixels or fewer than 2 images.
        RuntimeSessionError: ONNX Runtime cannot run the model.
    """
    config.validate()
    started_at = time.monotonic()
    deadline = None if config.time_limit is None else started_at + config.time_limit
    progress = progress or Progress()
    pool = _read_pool(source, config.images)
    if tuple(pool.shape[1:3]) != tuple(preprocess.size) or pool.shape[3] != preprocess.num_channels:
        raise CalibrationDataError(
            f"calibration images are {list(pool.shape[1:])} but the model takes "
            f"{preprocess.size[0]}x{preprocess.size[1]}x{preprocess.num_channels}")
    height, width, channels = (int(d) for d in pool.shape[1:])

    session = create_session(model, None, provider)
    output = model.outputs[0].name
    # The one pass over the calibration images always runs (it is what every class needs); the time
    # limit applies from the first optimiser call on.
    oracle = _Oracle(session, output, preprocess, config.max_queries, None)
    try:
        clean_out = oracle.logits(pool)
    except _OutOfBudget:
        raise UsageError(f"max_queries {config.max_queries} does not cover one pass over the "
                         f"{len(pool)} calibration images") from None
    oracle.deadline = deadline
    n_classes = _static_classes(model.outputs[0].shape) or clean_out.shape[1]
    if clean_out.shape[1] != n_classes:
        raise UsageError(f"the model's output '{output}' has {clean_out.shape[1]} values per image, "
                         f"expected {n_classes} class scores")
    # Probabilities (a Softmax at the end) need a log, logits need a log-softmax.
    oracle.probabilities = bool(np.all(clean_out >= 0) and np.allclose(clean_out.sum(axis=1), 1.0, atol=1e-3))
    pred = clean_out.argmax(axis=1)
    classes = tuple(range(n_classes)) if config.classes is None else tuple(config.classes)
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad:
        raise UsageError(f"classes {bad} are out of range: the model has {n_classes} classes")

    space = _Space(height, width, channels, config.mask_grid, config.pattern_grid)
    batch = config.batch
    step_cost = (2 * config.pairs + 1) * batch
    probe = _make_probe(model, provider) if config.evidence else None
    max_validations = int(math.ceil(math.log2(config.steps + 1))) + 1
    n_eval_max = min(config.eval_images, len(pool))
    # The ℓ∞ evidence runs the validation images twice through the probe: clean and stamped.
    plan = _Plan(step_cost, max_validations, n_eval_max, 2 * n_eval_max if probe is not None else 0,
                 _PRUNE_STEPS * step_cost, _patch_cost(config) if config.patches else 0)
    scan_cost = _scan_cost(len(pool), height, width, channels, config) if config.patches else 0
    needed = scan_cost + step_cost + plan.reserve
    if config.max_queries is not None and oracle.remaining() < needed:
        raise UsageError(f"max_queries {config.max_queries} is too small: one class needs at least "
                         f"{oracle.queries + needed} (calibration pass, patch scan, one step, validation, "
                         "evidence)")
    units = config.steps + (config.patch_steps if config.patches else 0)
    progress.start("synthesize", len(classes) * units)
    results: list[ClassTrigger] = []
    scan = None
    try:
        if config.patches:
            try:
                scan = _patch_scan(oracle, pool, _patch_sizes(height, width, config), config)
            except _OutOfBudget:
                log.warning("time limit reached during the patch scan")
        goal = min(1.0, config.asr + _SEARCH_MARGIN)
        for i, target in enumerate(classes):
            left = len(classes) - i
            t0, q0 = time.monotonic(), oracle.queries
            if not oracle.affordable(step_cost + plan.reserve):
                log.warning("query budget or time limit reached: classes %s not searched", list(classes[i:]))
                progress.advance(units * left)
                break
            candidates = pool[pred != target]
            if len(candidates) < 2:
                log.warning("class %d: the model predicts it for nearly every calibration image; skipped", target)
                progress.advance(units)
                continue
            rng = np.random.default_rng([config.seed, target, 1])
            order = rng.permutation(len(candidates))
            n_eval = min(config.eval_images, len(candidates))
            # Keep validation images apart from the search's when there are enough images for both.
            if len(candidates) - n_eval >= 4 * batch:
                evals, train = candidates[order[:n_eval]], candidates[order[n_eval:]]
            else:
                evals, train = candidates[order[:n_eval]], candidates
            # Share what is left (queries and time) equally among the classes still to search.
            max_steps = config.steps
            if config.max_queries is not None:
                share = oracle.remaining() / left - plan.reserve
                max_steps = max(0, min(max_steps, int(share // step_cost)))
            soft_deadline = None
            if deadline is not None:
                # Leave a tenth of the slice for validation, pruning and evidence.
                soft_deadline = time.monotonic() + 0.9 * (deadline - time.monotonic()) / left
            init, origin = None, "uniform"
            if scan is not None:
                found_patch = _patch_search(oracle, scan, target, train, config, progress)
                if found_patch is not None and found_patch[2] >= goal:
                    init, origin = space.from_patch(found_patch[0], found_patch[1]), "patch"
            else:
                progress.advance(units - config.steps)
            snapshots, fallback, steps = _search(oracle, space, target, train, config, max_steps,
                                                 soft_deadline, progress, init)
            theta, asr, found = _validate(oracle, space, target, evals, snapshots, fallback, config,
                                          max_validations)
            mask, pattern = space.decode(theta[None])
            mask, pattern = mask[0].astype(np.float32), pattern[0].astype(np.float32)
            if found:
                mask, asr = _pruned(oracle, space, target, mask, pattern, train, evals, asr, config, plan)
            concentration = None
            if probe is not None and found:
                concentration = _concentration(probe, oracle, evals, mask, pattern, preprocess, config)
            results.append(ClassTrigger(
                target=int(target), mask=mask, pattern=pattern, mask_l1=float(mask.sum()),
                asr=asr, found=found, queries=oracle.queries - q0, seconds=time.monotonic() - t0,
                steps=steps, concentration=concentration, start=origin))
            log.info("class %d: mask L1 %.1f, ASR %.2f%s, start %s, %d queries, %.1f s", target, mask.sum(), asr,
                     "" if found else " (not found)", origin, oracle.queries - q0, time.monotonic() - t0)
    finally:
        progress.finish()

    searched = [t.target for t in results]
    index = (anomaly_index(np.array([t.norm for t in results]), config.scale, np.array([t.found for t in results]))
             if results else np.zeros(0))
    anomaly = {c: float(v) for c, v in zip(searched, index)}
    suspected = suspected_classes(searched, index, config.threshold)
    return SynthResult(triggers=tuple(results), anomaly=anomaly, suspected=suspected, threshold=config.threshold,
                       queries=oracle.queries, seconds=time.monotonic() - started_at, config=config,
                       complete=len(results) == len(classes))


def _make_probe(model: Model, provider: str):
    """An instrumented session measuring per-channel ℓ∞ of the last activation map, or None."""
    # Imported here: `pipeline` imports half the package, and synthesis without evidence needs none of it.
    from .errors import NoTapsError, UnsupportedModelError
    from .pipeline import Probe
    from .taps import find_taps

    try:
        taps = find_taps(model, "last")
    except (NoTapsError, UnsupportedModelError) as exc:
        log.info("no ℓ∞ evidence: %s", exc)
        return None
    return Probe(model, taps, ("linf",), provider)


def _concentration(probe, oracle: _Oracle, evals: np.ndarray, mask: np.ndarray, pattern: np.ndarray,
                   preprocess: Preprocess, config: SynthConfig) -> float | None:
    """Share of the positive differential ℓ∞ held by the top `evidence_ratio` channels of the last map."""
    from .flag import differential_scores, top_k

    n = len(evals)
    if not oracle.affordable(2 * n):
        return None
    trigger = Trigger(pattern=pattern, mask=mask[..., None])
    clean = probe.measure(_PixelSource(evals, "validation images"), preprocess, _EVAL_CHUNK)
    stamped = probe.measure(_PixelSource(evals, "validation images"), preprocess, _EVAL_CHUNK, trigger)
    oracle.queries += 2 * n  # forwards through the probe session count against the same budget
    diff = next(iter(differential_scores(clean, stamped, "linf").values()))
    pos = np.clip(diff, 0.0, None)
    total = float(pos.sum())
    if total <= 0.0:
        return 0.0
    k = top_k(config.evidence_ratio, len(pos))
    return float(np.sort(pos)[::-1][:k].sum() / total)


# --------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------


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
