"""Options shared by several commands: preprocessing overrides and scan options."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..decide.flag import SCORE_STATS
from ..errors import UsageError
from ..measure.engine import EngineOptions
from ..measure.instrument import CHANNEL_STATS, DEFAULT_STATS
from ..measure.preprocess import Preprocess
from ..model.load import Model


@dataclass(frozen=True)
class PreprocessOptions:
    """User overrides of preprocessing; None = from the model (metadata, input shape) or defaults."""

    size: tuple[int, int] | None = None
    """(H, W) to resize images to."""
    layout: str | None = None
    """``NCHW`` or ``NHWC``."""
    channels: str | None = None
    """``RGB``, ``BGR`` or ``L``."""
    scale: float | None = None
    """Pixel multiplier (default 1/255)."""
    mean: tuple[float, ...] | None = None
    """Per-channel mean (after scaling)."""
    std: tuple[float, ...] | None = None
    """Per-channel std (after scaling)."""

    def resolve(self, model: Model) -> Preprocess:
        """The preprocessing for `model` (see `Preprocess.from_model`)."""
        return Preprocess.from_model(model, size=self.size, layout=self.layout, channels=self.channels,
                                     scale=self.scale, mean=self.mean, std=self.std)


#: Sample images of the HTML report's activation heatmaps (``scan --report``).
HEATMAP_IMAGES = 4


@dataclass(frozen=True)
class ScanConfig:
    """Options of a scan."""

    layers: str | tuple[str, ...] = "all"
    """``all``, ``all+branches``, ``last`` or explicit tap tensor names (see `find_taps`)."""
    policy: str = "ratio"
    """``ratio`` (top fraction per tap) or ``outliers`` (robust z-score)."""
    ratio: float = 0.1
    """Fraction of channels per tap the ratio policy flags."""
    threshold: float = 3.5
    """Robust z-score threshold of the outliers policy."""
    score: str = "linf"
    """Statistic scores rank by: ``linf``, ``l1`` or ``l2``."""
    stats: tuple[str, ...] = DEFAULT_STATS
    """Per-image statistics to measure (`score` is always measured too, see `measured_stats`)."""
    batch_size: int | str = 32
    """Images per ORT run, or ``auto`` (scan only: the largest batch that fits, see `auto_batch_size`)."""
    provider: str = "auto"
    """``auto``, ``cpu``, ``cuda`` or ``tensorrt``."""
    limit: int | None = None
    """Use at most this many calibration images."""
    preprocess: PreprocessOptions = field(default_factory=PreprocessOptions)
    """Preprocessing overrides."""
    engine: EngineOptions | str = "local"
    """Where statistics are computed: ``local``, ``ray``, or `EngineOptions` (workers, CPUs/GPUs per worker)."""
    heatmap_images: int = 0
    """Sample images whose flagged channels' activation maps are kept for the HTML report's heatmaps
    (0: none; `HEATMAP_IMAGES` is what ``scan --report`` asks for). Costs one more ORT session."""

    def validate(self) -> None:
        """Raise `UsageError` for inconsistent options."""
        EngineOptions.of(self.engine).validate()
        if self.policy not in ("ratio", "outliers"):
            raise UsageError(f"unknown policy {self.policy!r}: use ratio or outliers")
        if not 0.0 < self.ratio < 1.0:
            raise UsageError(f"--ratio must be in (0, 1), got {self.ratio}")
        if self.score not in SCORE_STATS:
            raise UsageError(f"--score must be one of {', '.join(SCORE_STATS)}, got {self.score!r}")
        unknown = [s for s in self.stats if s not in CHANNEL_STATS]
        if unknown:
            raise UsageError(f"unknown statistic {unknown[0]!r} in --stats: use {', '.join(CHANNEL_STATS)}")
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise UsageError(f"--batch-size must be a positive integer or 'auto', got {self.batch_size!r}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {self.limit}")
        if not isinstance(self.heatmap_images, int) or self.heatmap_images < 0:
            raise UsageError(f"heatmap_images must be an integer >= 0, got {self.heatmap_images!r}")

    @property
    def measured_stats(self) -> tuple[str, ...]:
        """`stats`, plus the ranking `score` when it is not among them."""
        return self.stats if self.score in self.stats else (*self.stats, self.score)
