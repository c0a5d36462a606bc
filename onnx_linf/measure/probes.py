"""Class-count-independent probes: where do whole-image perturbations of clean images send them?

A backdoor with a full-image trigger (a blended noise pattern, a sinusoidal signal) teaches the
network that a faint, image-wide pattern means the target class. Such a network usually also answers
*similar* patterns: blending an image with fresh uniform noise, or adding a sinusoidal grating of a
few /255, sends it to the target far more often than to any other class. Neural Cleanse's patch
search, which looks for a small mask per class, does not see these triggers, and its cost grows with
the number of classes; these probes cost a fixed number of forwards.

Families (each a list of probes, one perturbation rule applied to every calibration image):

* **noise blend**: ``x' = (1 - a) x + a u`` with ``u`` fresh uniform noise per image and repeat, for each
  blend weight ``a``;
* **grating bank**: ``x' = x + A sin(2 pi (fy r / H + fx c / W) + phi)`` (the same on every channel),
  over row, column and both diagonal orientations, 1 to `ProbeConfig.max_periods` periods across the
  image, `ProbeConfig.phases` phases (from a seeded offset), each amplitude ``A`` (in /255 of the pixel
  range), clipped to [0, 255].

Perturbations are applied in pixel space, then the model's preprocessing. For every probe the result
is, per class k, the share of the images *not* predicted as k on clean input that the probe sends to k
(`ProbeFamily.shares`); turning that into a verdict is `decide.probes`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..model.load import Model
from .preprocess import Preprocess, Trigger
from .session import Session, create_session

log = logging.getLogger(__name__)

FAMILIES = ("noise-blend", "grating")


@dataclass(frozen=True)
class ProbeConfig:
    """Options of the probe families."""

    images: int = 128
    """Calibration images probed (a seeded random subset when more are given)."""
    blend_alphas: tuple[float, ...] = (0.1, 0.15, 0.2)
    """Noise-blend weights."""
    blend_repeats: int = 1
    """Fresh noise draws per blend weight (each a probe)."""
    grating_amplitudes: tuple[float, ...] = (10.0, 20.0)
    """Grating amplitudes in pixel units (0-255)."""
    max_periods: int = 8
    """Gratings have 1 to this many periods across the image, per orientation."""
    phases: int = 4
    """Phases per grating, evenly spaced (4: every trigger phase is within 45 degrees of one)."""
    families: tuple[str, ...] = FAMILIES
    """Families to run."""
    seed: int = 0
    """RNG seed (image subset, noise draws, grating phase offset): the same seed gives the same shares."""
    batch_size: int = 128
    """Images per ONNX Runtime call."""

    def validate(self) -> None:
        """Raise `UsageError` for inconsistent options."""
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise UsageError(f"probe families must be among {', '.join(FAMILIES)}, got {self.families!r}")
        if self.images < 2:
            raise UsageError(f"the probes need at least 2 images, got {self.images}")
        if not all(0.0 < a < 1.0 for a in self.blend_alphas) or not self.blend_alphas:
            raise UsageError(f"blend weights must be in (0, 1), got {self.blend_alphas!r}")
        if self.blend_repeats < 1:
            raise UsageError(f"blend_repeats must be >= 1, got {self.blend_repeats}")
        if not all(0.0 < a <= 255.0 for a in self.grating_amplitudes) or not self.grating_amplitudes:
            raise UsageError(f"grating amplitudes must be in (0, 255], got {self.grating_amplitudes!r}")
        if self.max_periods < 1:
            raise UsageError(f"max_periods must be >= 1, got {self.max_periods}")
        if self.phases < 1:
            raise UsageError(f"phases must be >= 1, got {self.phases}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")

    def forwards(self, images: int, size: tuple[int, int]) -> int:
        """Image forwards of a run on `images` calibration images (clean pass included)."""
        n = min(images, self.images)
        return n * (1 + sum(len(probe_specs(f, self, size)) for f in self.families))


@dataclass(frozen=True)
class ProbeSpec:
    """One probe: a family and its parameters."""

    family: str
    params: dict

    def describe(self) -> str:
        """Short text, e.g. ``alpha 0.2 #1`` or ``columns 6 periods, phase 0.0, amplitude 20``."""
        p = self.params
        if self.family == "noise-blend":
            return f"alpha {p['alpha']:g} #{p['repeat']}"
        return f"{p['orientation']} {p['periods']} periods, phase {p['phase']:.2f}, amplitude {p['amplitude']:g}"


def probe_specs(family: str, config: ProbeConfig, size: tuple[int, int], phase: float = 0.0) -> list[ProbeSpec]:
    """The probes of one family, in a fixed order; `phase` offsets every grating's phase (radians)."""
    if family == "noise-blend":
        return [ProbeSpec(family, {"alpha": float(a), "repeat": r})
                for a in config.blend_alphas for r in range(config.blend_repeats)]
    h, w = size
    out = []
    for amp in config.grating_amplitudes:
        for orientation in ("rows", "columns", "diagonal", "antidiagonal"):
            for periods in range(1, config.max_periods + 1):
                if periods > max(h, w) // 2:
                    continue  # above the Nyquist rate of the image
                for shift in np.arange(config.phases) * (2 * np.pi / config.phases):
                    out.append(ProbeSpec(family, {"orientation": orientation, "periods": periods,
                                                  "phase": float(phase + shift), "amplitude": float(amp)}))
    return out


def grating(spec: ProbeSpec, size: tuple[int, int]) -> np.ndarray:
    """float32 ``[H, W, 1]`` sinusoid of a grating probe, in pixel units."""
    h, w = size
    p = spec.params
    r = np.arange(h, dtype=np.float64)[:, None] / h
    c = np.arange(w, dtype=np.float64)[None, :] / w
    k = p["periods"]
    arg = {"rows": k * r + 0 * c, "columns": 0 * r + k * c, "diagonal": k * (r + c),
           "antidiagonal": k * (r - c)}[p["orientation"]]
    return (p["amplitude"] * np.sin(2 * np.pi * arg + p["phase"]))[..., None].astype(np.float32)


def probe_trigger(spec: ProbeSpec, preprocess: Preprocess, seed: int = 0) -> Trigger:
    """One probe as a trigger stamped the same way on every image, for channel ranking (``prune``).

    A grating adds its sinusoid (`Trigger.offset`), exactly as the probe did. A noise blend blends
    *one* seeded uniform-noise image at the probe's weight: the probe drew fresh noise per image,
    which a network that answers any such blend answers for one draw too.
    """
    h, w = preprocess.size
    c = preprocess.num_channels
    if spec.family == "grating":
        return Trigger(pattern=np.zeros((h, w, c), np.float32), mask=np.zeros((h, w, 1), np.float32),
                       offset=grating(spec, (h, w)), description=f"grating probe ({spec.describe()})")
    noise = np.random.default_rng(seed).uniform(0.0, 255.0, (h, w, c)).astype(np.float32)
    alpha = float(spec.params["alpha"])
    return Trigger(pattern=noise, mask=np.full((h, w, 1), alpha, np.float32),
                   description=f"noise-blend probe (alpha {alpha:g}, one uniform-noise image, seed {seed})")


@dataclass(frozen=True)
class ProbeFamily:
    """Predictions of one family's probes on the probed images."""

    family: str
    probes: tuple[ProbeSpec, ...]
    predictions: np.ndarray
    """int ``[probes, images]``: top-1 class of each perturbed image."""
    queries: int
    """Image forwards spent on this family."""
    seconds: float
    """Wall-clock seconds."""

    def shares(self, clean: np.ndarray, num_classes: int) -> np.ndarray:
        """float64 ``[probes, classes]``: per probe, the share of the images not predicted as class k on
        clean input that the probe sends to k (0 for a class every image is predicted as)."""
        others = (clean[None, :] != np.arange(num_classes)[:, None])  # [classes, images]
        n_other = others.sum(axis=1)
        out = np.zeros((len(self.probes), num_classes))
        for i, pred in enumerate(self.predictions):
            hits = (pred[None, :] == np.arange(num_classes)[:, None]) & others
            out[i] = np.where(n_other > 0, hits.sum(axis=1) / np.maximum(n_other, 1), 0.0)
        return out


@dataclass(frozen=True)
class ProbeRun:
    """Everything the probes measured on one model."""

    clean: np.ndarray
    """int ``[images]``: top-1 class of each clean probed image."""
    num_classes: int
    families: tuple[ProbeFamily, ...]
    clean_queries: int
    """Forwards of the clean pass (shared by the families)."""
    seconds: float
    """Wall-clock seconds in all."""

    def family(self, name: str) -> ProbeFamily:
        """The family called `name`."""
        return next(f for f in self.families if f.family == name)


def _predict(session: Session, output: str, preprocess: Preprocess, pixels: np.ndarray,
             batch: int) -> np.ndarray:
    chunk = session.fixed_batch or batch
    preds = []
    for i in range(0, len(pixels), chunk):
        out = np.asarray(session.run([output], preprocess.apply(pixels[i:i + chunk]))[0])
        preds.append(out.reshape(out.shape[0], -1).argmax(axis=1))
    return np.concatenate(preds)


def _num_classes(session: Session, output: str, preprocess: Preprocess, pixels: np.ndarray) -> int:
    out = np.asarray(session.run([output], preprocess.apply(pixels[:1]))[0])
    return int(out.reshape(out.shape[0], -1).shape[1])


def run_probes(model: Model, preprocess: Preprocess, pixels: np.ndarray, config: ProbeConfig | None = None,
               provider: str = "auto", session: Session | None = None) -> ProbeRun:
    """Run every configured probe family on clean pixels.

    Args:
        model: the classifier; its first output holds the class scores.
        preprocess: how pixels become the input.
        pixels: uint8 or float ``[N, H, W, C]`` clean calibration images in [0, 255]; with more
            than `config.images`, a seeded random subset is probed.
        config: probe options.
        provider: ONNX Runtime provider.
        session: an existing session of `model` (default: one is created).

    Returns:
        Clean predictions and every probe's predictions, with the cost.

    Raises:
        UsageError: bad options, too few images, or a model with fewer than 2 class scores.
        RuntimeSessionError: ONNX Runtime rejects the model.
    """
    config = config or ProbeConfig()
    config.validate()
    start = time.monotonic()
    rng = np.random.default_rng(config.seed)
    x = np.asarray(pixels)
    if len(x) < 2:
        raise UsageError(f"the probes need at least 2 calibration images, got {len(x)}")
    if len(x) > config.images:
        x = x[np.sort(rng.choice(len(x), config.images, replace=False))]
    x = x.astype(np.float32)
    phase = float(rng.uniform(0.0, 2 * np.pi))
    session = session or create_session(model, None, provider)
    output = model.outputs[0].name
    num_classes = _num_classes(session, output, preprocess, x)
    if num_classes < 2:
        raise UsageError(f"the probes need a classifier with 2 or more class scores, got {num_classes}")
    clean = _predict(session, output, preprocess, x, config.batch_size)
    families = []
    for name in config.families:
        t0 = time.monotonic()
        specs = probe_specs(name, config, preprocess.size, phase)
        preds = []
        for spec in specs:
            if name == "noise-blend":
                a = spec.params["alpha"]
                noise = rng.uniform(0.0, 255.0, x.shape).astype(np.float32)
                perturbed = (1.0 - a) * x + a * noise
            else:
                perturbed = np.clip(x + grating(spec, preprocess.size), 0.0, 255.0)
            preds.append(_predict(session, output, preprocess, perturbed, config.batch_size))
        families.append(ProbeFamily(name, tuple(specs), np.stack(preds), len(specs) * len(x),
                                    time.monotonic() - t0))
        log.info("probe family %s: %d probes, %d forwards, %.1f s", name, len(specs), families[-1].queries,
                 families[-1].seconds)
    return ProbeRun(clean=clean, num_classes=num_classes, families=tuple(families), clean_queries=len(x),
                    seconds=time.monotonic() - start)
