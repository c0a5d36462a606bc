"""Options and typed results of trigger synthesis."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ...errors import UsageError
from ...measure.preprocess import Trigger


@dataclass(frozen=True)
class SynthConfig:
    """Options of `synthesize`. Defaults are tuned on small CNNs (16x16 digits, 32x32 CIFAR-10)."""

    classes: tuple[int, ...] | None = None
    """Candidate target classes; None = every class of the model's output, or on a model with more
    than ``candidates + references`` classes those the pre-selection picks."""
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
    candidates: int | None = 8
    """Pre-selection: on a model with more than ``candidates + references`` classes (and `classes`
    None), only this many candidate target classes, picked by cheap per-class scores (see
    `preselect`), plus `references` random classes are searched. None = search every class."""
    references: int = 8
    """Random classes searched besides the candidates: an unbiased sample of the other classes, so
    that the anomaly index keeps a baseline (see `preselect.baseline_weights`)."""

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
            (self.candidates is None or self.candidates >= 1, f"candidates must be >= 1, got {self.candidates}"),
            (self.references >= 0, f"references must be >= 0, got {self.references}"),
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
class Preselection:
    """Which classes the per-class search examined on a many-class model, and why."""

    num_classes: int
    scores: dict[str, np.ndarray] = field(repr=False)
    """Source name -> per-class score ``[num_classes]``, higher = more likely a target."""
    candidates: tuple[int, ...]
    """Classes picked by the scores, in the order they were picked (round robin over the sources)."""
    references: tuple[int, ...]
    """Random other classes searched for the baseline of the anomaly index."""

    def rank(self, source: str, target: int) -> int:
        """1-based rank of `target` under one source (1 = most suspicious; ties by class index)."""
        order = np.argsort(-np.asarray(self.scores[source]), kind="stable")
        return int(np.flatnonzero(order == target)[0]) + 1

    def rank_text(self, target: int | None) -> str:
        """``candidate (patch_scan 1, clean_logp 40)``-style summary of one class's selection."""
        if target is None:
            return "-"
        role = ("candidate" if target in self.candidates
                else "reference" if target in self.references else "not examined")
        ranks = ", ".join(f"{s} {self.rank(s, target)}" for s in self.scores)
        return f"{role} ({ranks})"

    def to_dict(self) -> dict:
        return {"num_classes": self.num_classes, "candidates": list(self.candidates),
                "references": list(self.references),
                "scores": {k: [round(float(v), 4) for v in vals] for k, vals in self.scores.items()}}


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
    """False when the query budget or time limit skipped some requested classes (classes the
    pre-selection left out do not count: see `not_examined`)."""
    num_classes: int = 0
    """Classes of the model's output."""
    not_examined: dict[int, str] = field(default_factory=dict)
    """Classes of the model whose trigger was not searched -> why: ``pre-selection`` (scored low),
    ``budget`` (--max-queries), ``time`` (--time-limit), ``not requested`` (outside `classes`) or
    ``predicted for nearly every image``."""
    preselection: Preselection | None = None
    """The pre-selection's scores and picks; None when every requested class was searched."""

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
            "num_classes": self.num_classes,
            "examined": [t.target for t in self.triggers],
            "not_examined": _by_reason(self.not_examined),
            "preselection": None if self.preselection is None else self.preselection.to_dict(),
            "config": config,
        }


def _by_reason(skipped: dict[int, str]) -> dict[str, list[int]]:
    """{class: reason} -> {reason: [classes]} (classes ascending)."""
    out: dict[str, list[int]] = {}
    for c in sorted(skipped):
        out.setdefault(skipped[c], []).append(int(c))
    return out
