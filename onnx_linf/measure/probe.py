"""An instrumented ORT session that measures a fixed set of maps on any data source."""

from __future__ import annotations

from collections.abc import Sequence

from ..model.load import Model
from ..model.taps import Tap
from .calibrate import Progress, run_batches
from .instrument import BATCH_STATS, DEFAULT_STATS, POSITION_STATS, TOPK_STATS, instrument
from .preprocess import Preprocess, Trigger
from .session import Session, create_session
from .sources import DataSource
from .stats import ChannelStats, StatsCollector


class Probe:
    """An instrumented ORT session that measures a fixed set of taps on any data source."""

    def __init__(self, model: Model, taps: Sequence[Tap], stats: Sequence[str] = DEFAULT_STATS,
                 provider: str = "auto", per_tap_stats: dict[str, Sequence[str]] | None = None,
                 topk: int = 1) -> None:
        self.model = model
        self.taps = list(taps)
        self.topk = topk
        self.instrumented = instrument(model, self.taps, stats, per_tap_stats, topk=topk)
        self.session: Session = create_session(model, self.instrumented, provider)
        self.batch_level = [name for name, ref in self.instrumented.outputs.items()
                            if ref.stat in POSITION_STATS + BATCH_STATS + TOPK_STATS]

    @property
    def provider(self) -> str:
        """The ORT provider that runs."""
        return self.session.provider

    def measure(self, source: DataSource, preprocess: Preprocess, batch_size: int,
                trigger: Trigger | None = None, progress: Progress | None = None) -> dict[str, ChannelStats]:
        """Stream `source` (stamped with `trigger` if given) and aggregate statistics per tap."""
        collector = StatsCollector(self.instrumented.outputs, {t.name: t.channels for t in self.taps}, self.topk)
        names = self.instrumented.output_names()
        sizes: list[int] = []
        for values in run_batches(self.session, source, preprocess, names, batch_size, trigger, progress,
                                  batch_level=self.batch_level, on_batch=lambda b: sizes.append(len(b))):
            collector.update(values, images=sizes[-1])
        return collector.result()
