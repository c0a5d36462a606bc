"""An instrumented ORT session that measures a fixed set of maps on any data source."""

from __future__ import annotations

from collections.abc import Sequence

from ..model.load import Model
from ..model.taps import Tap
from .calibrate import Progress
from .engine import Engine, LocalEngine, SessionSpec, StatsJob
from .instrument import BATCH_STATS, DEFAULT_STATS, POSITION_STATS, TOPK_STATS, instrument
from .preprocess import Preprocess, Trigger
from .session import Session, create_session
from .sources import DataSource
from .stats import ChannelStats


class Probe:
    """An instrumented ORT session that measures a fixed set of taps on any data source."""

    def __init__(self, model: Model, taps: Sequence[Tap], stats: Sequence[str] = DEFAULT_STATS,
                 provider: str = "auto", per_tap_stats: dict[str, Sequence[str]] | None = None,
                 topk: int = 1, engine: Engine | None = None) -> None:
        self.model = model
        self.taps = list(taps)
        self.topk = topk
        self.engine = engine or LocalEngine()
        self.requested_provider = provider
        self.instrumented = instrument(model, self.taps, stats, per_tap_stats, topk=topk)
        # Also for the Ray engine: loading the graph here fails fast, before a cluster is involved.
        self.session: Session = create_session(model, self.instrumented, provider, threads=self.engine.threads)
        self.batch_level = [name for name, ref in self.instrumented.outputs.items()
                            if ref.stat in POSITION_STATS + BATCH_STATS + TOPK_STATS]

    @property
    def provider(self) -> str:
        """The ORT provider that runs (the workers' after a pass on a cluster)."""
        return self.engine.provider or self.session.provider

    def measure(self, source: DataSource, preprocess: Preprocess, batch_size: int,
                trigger: Trigger | None = None, progress: Progress | None = None) -> dict[str, ChannelStats]:
        """Stream `source` (stamped with `trigger` if given) and aggregate statistics per tap, on `engine`."""
        job = StatsJob(self.instrumented.outputs, {t.name: t.channels for t in self.taps}, self.topk,
                       tuple(self.batch_level), trigger)
        spec = SessionSpec(self.model, self.instrumented, self.requested_provider)
        return self.engine.run(job, spec, source, preprocess, batch_size, progress, session=self.session)
